"""`python -m tools.train_tiny [options]`, from the repository root."""

from tools.train_tiny.cli import main

raise SystemExit(main())
