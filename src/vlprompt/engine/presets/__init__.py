"""Packaged YAML presets, one file per (method, protocol): ``<method>/<protocol>.yaml``.

Each file has ``source`` (where the values come from), ``notes``, a ``default`` section (the original code's
values) and optional ``variants`` (``paper``: the paper's values where they differ) applied on top of it. Inside a
section, ``by_shots`` and ``by_dataset`` refine it. Read by :func:`vlprompt.engine.config.resolve_preset`; the
values are listed in docs/reproduce.md.
"""
