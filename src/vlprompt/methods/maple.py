"""MaPLe (Khattak et al., CVPR'23): text prompts with visual prompts coupled by a linear map per depth.

ALIGN with M = N = 1 (exactly: reference-mode ALIGN with one prompt per side is MaPLe). n_ctx 2 with "a photo of
a" ("of a" fixed), depth 9; the cross-dataset / domain-generalisation configs use depth 3.
"""

PRESET = dict(n_text_prompts=1, text_n_ctx=2, text_ctx_init="a photo of a", text_depth=9,
              n_visual_prompts=1, visual_n_ctx=2, coupling="linear", matching="cosine")
