"""``python -m orchestrator``: the ``convergent`` command without its console script."""

from orchestrator.cli import main

main()
