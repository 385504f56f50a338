"""`python -m seesr` runs the `seesr` command."""

import sys

from seesr.cli import main

if __name__ == "__main__":
    sys.exit(main())
