"""``python -m loraforge`` (what ``torchrun -m loraforge train CONFIG`` starts on every rank)."""

import sys

from loraforge.cli import main

sys.exit(main())
