"""``python -m loopformer`` runs the command line."""

import sys

from loopformer.console import main

sys.exit(main())
