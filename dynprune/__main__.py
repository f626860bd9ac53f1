"""``python -m dynprune`` == the ``dynprune`` console script."""

from dynprune.entry import main

main()
