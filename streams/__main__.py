"""``python -m dspex.streams`` runs the ``dspex`` command line."""

from dspex.streams.cli import main

main()
