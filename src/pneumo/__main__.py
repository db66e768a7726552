"""`python -m pneumo` is the `pneumo` command."""

from pneumo.cli import main

main()
