"""`python -m core` runs the `idap` CLI."""

import sys

from core.cli import main

sys.exit(main())
