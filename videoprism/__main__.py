"""`python -m videoprism ...` runs the `videoprism` command (videoprism/cli.py)."""
import sys

from .cli import main

sys.exit(main())
