"""`python -m deltatune ...` (used by torchrun) is the same as the `deltatune` command."""
from deltatune.cli import main

raise SystemExit(main())
