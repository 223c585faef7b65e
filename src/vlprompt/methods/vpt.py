"""VPT, CLIP variant of the MaPLe code base ("deep vision prompting"; VPT, ECCV 2022).

ALIGN with M = 1 free visual prompt set, N = 0: the text side is CLIP's frozen "a photo of a {}." features.
Deep: 8 prompt tokens at blocks 0..11 appended after the patches, N(0, 0.02²) init. ``vpt_shallow``: layer 0 only.
Original-VPT placement (after the class token, uniform init) via ``visual_position="after_cls",
visual_init="uniform"``.
"""

PRESET = dict(n_text_prompts=0, templates=["a photo of a {}."], text_depth=1,
              n_visual_prompts=1, visual_n_ctx=8, visual_depth=12, coupling="independent", matching="cosine")
SHALLOW_PRESET = dict(PRESET, visual_depth=1)
