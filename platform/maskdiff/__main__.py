"""``python -m maskdiff COMMAND ...``: the same as the ``maskdiff`` command."""

import sys

from maskdiff.commands import main

if __name__ == "__main__":
    sys.exit(main())
