"""Using trained prompts: :mod:`~vlprompt.inference.predictor` (``vlprompt.load`` → a ``Predictor`` over images)
and :mod:`~vlprompt.inference.explain` (the transport plan behind a prediction)."""
