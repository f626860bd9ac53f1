"""``python -m dynprune`` == the ``dynprune`` console script."""

from dynprune.cli import main

main()
