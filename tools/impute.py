#!/usr/bin/env python
"""Fill the missing cells of a table, each conditioned on the observed cells of its row.

The same as ``maskdiff impute``; the code is maskdiff.commands.impute.
"""

import os
import sys

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads: idle OpenMP threads yield the core

from maskdiff.commands.impute import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
