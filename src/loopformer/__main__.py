"""``python -m loopformer`` runs the command line."""

import sys

from loopformer.cli import main

sys.exit(main())
