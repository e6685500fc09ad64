"""``python -m glomscan.cli ...`` is the ``glomscan`` command."""

from . import main

main()
