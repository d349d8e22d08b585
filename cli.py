"""``python cli.py ...`` from a checkout: the ``simcache`` command (simcache/cli.py)."""

from simcache.cli import main

if __name__ == "__main__":
    main()
