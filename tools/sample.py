#!/usr/bin/env python
"""Sample images pixel by pixel from a trained model: unconditional, class-conditional, or inpainting.

The same as ``maskdiff sample``; the code is maskdiff.commands.sample.
"""

import sys

from maskdiff.commands.sample import main

if __name__ == "__main__":
    sys.exit(main())
