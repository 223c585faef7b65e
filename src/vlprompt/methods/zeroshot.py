"""Zero-shot CLIP: the dataset's hand-written template (or a template ensemble), nothing learned.

ALIGN with N = 0 (frozen text), M = 0 (plain image view), cosine matching.
Option ``templates=[...]`` averages the normalised class features over several templates (CLIP ensembling).
"""

PRESET = dict(n_text_prompts=0, n_visual_prompts=0, text_depth=1, visual_depth=1, matching="cosine")
