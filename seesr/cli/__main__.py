"""``python -m seesr.cli ...`` runs the `seesr` command (as used under ``accelerate launch``)."""

import sys

from seesr.cli import main

sys.exit(main())
