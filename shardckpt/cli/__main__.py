"""`python -m shardckpt.cli`: the console script."""

import sys

from . import main

sys.exit(main())
