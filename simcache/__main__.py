"""``python -m simcache`` runs the command line."""

from simcache.cli import run

run()
