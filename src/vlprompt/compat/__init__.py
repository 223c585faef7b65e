"""Checkpoints of the original code bases (CoOp, CoCoOp, PLOT, MaPLe, ALIGN/MMP, IVLP, PromptSRC, VPT).

* :func:`import_original` — an original ``model.pth.tar-<epoch>`` → our method with its parameters, read by a
  restricted unpickler that never executes code from the file (:mod:`vlprompt.weights.unpickler`).
* :func:`export_original` — our method's parameters → a checkpoint in the original names and shapes.
* :func:`read_original` — the translated tensors and inferred options, without building a model.

The name and shape mappings are data in :mod:`vlprompt.compat.mappings`; docs/compat.md has the tables.
"""

from vlprompt.lazy import lazy_exports

# Imported on first use (see vlprompt.lazy), so that importing the package does not import torch.
lazy_exports(__name__, {
    "OriginalCheckpoint": "convert",
    "export_original": "convert",
    "import_original": "convert",
    "read_original": "convert",
    "SOURCES": "mappings",
    "Placeholder": "vlprompt.weights.unpickler",
    "load_pickled": "vlprompt.weights.unpickler",
})

__all__ = ["SOURCES", "OriginalCheckpoint", "Placeholder", "export_original", "import_original", "load_pickled",
           "read_original"]
