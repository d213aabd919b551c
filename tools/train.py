#!/usr/bin/env python
"""Train one masked-diffusion model over several modalities from a config, under DeepSpeed.

The same as ``maskdiff train``; the code is maskdiff.commands.train.
"""

import os
import sys

if "OMP_WAIT_POLICY" not in os.environ:  # before torch loads: see ENVIRONMENT in maskdiff.commands.train
    os.environ.setdefault("GOMP_SPINCOUNT", "1000")

from maskdiff.commands.train import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
