"""``python -m hif4fmt`` runs the same click group as the ``hif4fmt`` console script."""

from hif4fmt.cli import main

if __name__ == "__main__":
    main()
