"""Independent vision-language prompting (IVLP, MaPLe code base): free deep text and visual prompts.

ALIGN with M = N = 1, ``coupling="independent"``: text n_ctx 2 ("a photo of a": "a photo" learned, "of a" fixed),
visual n_ctx 2, both at blocks 0..11. ``ivlp_text`` is the text-only "deep language prompting" variant (n_ctx 4).
"""

PRESET = dict(n_text_prompts=1, text_n_ctx=2, text_ctx_init="a photo of a", text_depth=12,
              n_visual_prompts=1, visual_n_ctx=2, visual_depth=12, coupling="independent", matching="cosine")
TEXT_ONLY_PRESET = dict(n_text_prompts=1, text_n_ctx=4, text_ctx_init="a photo of a", text_depth=12,
                        n_visual_prompts=0, matching="cosine")
