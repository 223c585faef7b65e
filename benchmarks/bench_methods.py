"""Training and evaluation speed and memory of the prompt methods (ViT-B/16 shapes, random weights).

Same as ``vlprompt bench``; see :mod:`vlprompt.bench` for what is measured and how. Examples::

    python benchmarks/bench_methods.py --quick
    python benchmarks/bench_methods.py --json bench.json --markdown bench.md   # the full run (~1 hour, 2 cores)
    python benchmarks/bench_methods.py --only train,memory
"""

import sys

from vlprompt.cli.bench import main

if __name__ == "__main__":
    sys.exit(main())
