"""vlprompt: prompt learning for CLIP-style vision-language models."""

__version__ = "0.1.0"

# ``vlprompt.load`` and friends live in vlprompt.api; imported on first use so that ``import vlprompt`` stays cheap.
_API = ("load", "Predictor", "Prediction")


def __getattr__(name):
    if name in _API:
        from vlprompt import api

        return getattr(api, name)
    raise AttributeError(f"module 'vlprompt' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_API))
