"""UPT (Zang et al., 2022): one shared token set, transformed jointly, split into a text and a visual prompt.

ALIGN with M = N = 1, ``coupling="shared_generator"``: 2·4 shared tokens → a one-layer attention + MLP block →
first 4 = text context (CoOp-style, shallow, class at the end), last 4 → Linear → visual prompt inserted after the
class token, shallow.
"""

PRESET = dict(n_text_prompts=1, text_n_ctx=4, text_ctx_init=None, text_depth=1,
              n_visual_prompts=1, visual_n_ctx=4, visual_depth=1, visual_position="after_cls",
              coupling="shared_generator", matching="cosine")
