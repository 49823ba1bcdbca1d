"""``python -m deltatune.training train|eval|generate|chat ...`` (the same verbs as ``deltatune``)."""
from deltatune.training.commands import main

raise SystemExit(main())
