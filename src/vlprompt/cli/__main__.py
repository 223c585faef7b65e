"""``python -m vlprompt.cli``: the ``vlprompt`` command, for launchers that take a module (``torchrun -m``)."""

import sys

from vlprompt.cli import main

if __name__ == "__main__":  # pragma: no cover - the entry point
    sys.exit(main())
