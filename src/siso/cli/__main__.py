"""``python -m siso.cli``: the same entry point as the ``siso`` command."""

from . import main

main()
