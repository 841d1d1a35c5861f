"""`python -m pneumoscan`: the command line, as the `pneumoscan` script runs it."""

from pneumoscan.cli import main

# Guarded: worker processes started with "spawn" import this module again.
if __name__ == "__main__":
    main()
