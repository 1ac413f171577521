"""``python -m splitfed.cli``: the ``splitfed`` command."""

from splitfed.cli import main

main()
