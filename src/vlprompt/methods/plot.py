"""PLOT (Chen et al., ICLR'23): N CoOp-style text prompts matched to the image's local features by OT.

ALIGN with M = 0, N = 4, ``matching="plot"``: per (image, class) an entropic OT (ε = 0.1) between the patch tokens
(projected into the joint space; the original uses RN50 attention-pool outputs) and the N prompt features;
logit = scale·Σ T ⊙ cos. n_ctx 16, random init, shallow. ``plot_global=True`` adds the global logit (ImageNet).
"""

PRESET = dict(n_text_prompts=4, text_n_ctx=16, text_ctx_init=None, text_depth=1,
              n_visual_prompts=0, matching="plot")
