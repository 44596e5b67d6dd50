"""``python -m orchestrator``: the ``convergent`` command without its console script."""

from orchestrator.cli import main

raise SystemExit(main())  # a command's exit status (audit verify's 1 or 3), as the script's
