"""``python -m fastbert finetune|pretrain`` (see :mod:`fastbert.cli`)."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
