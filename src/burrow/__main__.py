"""``python -m burrow`` runs the ``burrow`` command."""

from burrow.cli import main

main()
