"""``python -m wan_runtime ...`` runs the ``wan-runtime`` CLI."""

from wan_runtime.cli import main

main()
