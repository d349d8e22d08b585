"""``python -m simcache`` runs the command line."""

from simcache.cli import run

if __name__ == "__main__":
    run()
