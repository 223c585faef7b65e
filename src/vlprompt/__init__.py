"""vlprompt: prompt learning for CLIP-style vision-language models."""

from vlprompt.lazy import lazy_exports

__version__ = "0.1.0"

# ``vlprompt.load`` and friends live in vlprompt.api, imported on first use so that ``import vlprompt`` (and with
# it ``vlprompt --version`` and ``--help``) does not import torch.
lazy_exports(__name__, {"load": "api", "Predictor": "api", "Prediction": "api"})
