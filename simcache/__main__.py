"""``python -m simcache`` runs the command line."""

from simcache.cli import main

if __name__ == "__main__":
    main()
