#!/usr/bin/env python
"""Train one masked-diffusion model over several modalities from a config, under DeepSpeed.

The same as ``maskdiff train``; the code is maskdiff.commands.train.
"""

import sys

from maskdiff.commands.train import main

if __name__ == "__main__":
    sys.exit(main())
