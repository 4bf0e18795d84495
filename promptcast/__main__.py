"""`python -m promptcast`: the `promptcast` command."""

from promptcast.cli import main

main()
