"""``python -m streams`` runs the ``dspex`` command line."""

from streams.cli import main

main()
