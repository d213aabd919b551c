#!/usr/bin/env python
"""Evaluate a trained model's ELBO on shards: bits per token per modality (bits per dimension for images).

The same as ``maskdiff evaluate``; the code is maskdiff.commands.evaluate.
"""

import sys

from maskdiff.commands.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
