"""``python -m packetless``: the same as the ``packetless`` console script."""

from packetless.cli import main

main()
