"""`python -m threetowers ...` and `torchrun ... -m threetowers ...`: the `threetowers` command."""

import sys

from .apps.cli import main

if __name__ == "__main__":
    sys.exit(main())
