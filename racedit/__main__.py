"""``python -m racedit``: see racedit.cli."""
import sys

from .cli import main

sys.exit(main())
