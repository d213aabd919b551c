#!/usr/bin/env python
"""Generate or infill protein sequences with a trained model and write them as FASTA.

The same as ``maskdiff protein``; the code is maskdiff.commands.protein.
"""

import sys

from maskdiff.commands.protein import main

if __name__ == "__main__":
    sys.exit(main())
