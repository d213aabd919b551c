#!/usr/bin/env python
"""Turn raw files into token shards that training reads.

The same as ``maskdiff shard``; the code is maskdiff.commands.shard.
"""

import sys

from maskdiff.commands.shard import main

if __name__ == "__main__":
    sys.exit(main())
