"""``python -m vlprompt.bench KIND CONFIG``: one measurement in a fresh process (:mod:`vlprompt.bench.children`)."""

import sys

from vlprompt.bench.children import _child_main

if __name__ == "__main__":  # pragma: no cover - started by vlprompt.bench.children._run_child
    _child_main(sys.argv[1:])
