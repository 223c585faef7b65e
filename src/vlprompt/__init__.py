"""vlprompt: prompt learning for CLIP-style vision-language models."""

from vlprompt.lazy import lazy_exports

__version__ = "0.1.0"

# The public API, imported on first use so that ``import vlprompt`` (and with it ``vlprompt --version`` and ``--help``)
# does not import torch: ``vlprompt.load`` (a trained run or prompts file -> Predictor), ``vlprompt.load_clip`` (a
# backbone), ``vlprompt.build_method`` and ``vlprompt.available_methods``.
lazy_exports(__name__, {
    "load": "inference.predictor",
    "Predictor": "inference.predictor",
    "Prediction": "inference.predictor",
    "load_clip": "weights",
    "build_method": "methods",
    "available_methods": "methods",
})
