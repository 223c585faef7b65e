"""CoOp (Zhou et al., IJCV'22): a learned text context, shallow; the image branch is plain CLIP.

ALIGN with M = 0, N = 1, β = 0, text depth 1. Original code: n_ctx 16, random N(0, 0.02²) init, class token at
the end, unified context (``csc=True`` for class-specific, ``class_position="middle"|"front"``). The ``*_ctxv1``
configs use ``text_n_ctx=4, text_ctx_init="a photo of a"``.
"""

PRESET = dict(n_text_prompts=1, text_n_ctx=16, text_ctx_init=None, text_depth=1,
              n_visual_prompts=0, matching="cosine")
