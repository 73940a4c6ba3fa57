"""``python -m loopformer.train ...`` == ``loopformer train ...`` (the form torchrun launches)."""

import sys

from loopformer.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
