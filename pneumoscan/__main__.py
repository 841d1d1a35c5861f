"""`python -m pneumoscan`: the command line, as the `pneumoscan` script runs it."""

from .cli import main

main()
