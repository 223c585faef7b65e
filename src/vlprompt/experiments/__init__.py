"""Running experiments: the protocols (:mod:`~vlprompt.experiments.protocols`: ``run_experiment``, ``plan``), many
runs at once (:mod:`~vlprompt.experiments.sweep`), the published grids (:mod:`~vlprompt.experiments.reproduce`,
numbers in :mod:`~vlprompt.experiments.reference`) and the tables built from run folders
(:mod:`~vlprompt.experiments.report`). Built on :mod:`vlprompt.engine`; the command line is :mod:`vlprompt.cli`.
"""
