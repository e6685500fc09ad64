"""``python -m glomscan ...`` is the ``glomscan`` command."""

from .cli import main

main()
