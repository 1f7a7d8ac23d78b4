"""`python -m orchestrator ...` is the `sana-rl` command (what `ray job submit` runs)."""

import sys

from orchestrator.cli import main

sys.exit(main())
