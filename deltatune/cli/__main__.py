"""``python -m deltatune.cli``: the ``deltatune`` command."""
from deltatune.cli import main

raise SystemExit(main())
