#!/usr/bin/env python
"""Infill or continue text with a trained model, from a template with masked spans.

The same as ``maskdiff text``; the code is maskdiff.commands.text.
"""

import sys

from maskdiff.commands.text import main

if __name__ == "__main__":
    sys.exit(main())
