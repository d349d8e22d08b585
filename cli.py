"""``python cli.py ...`` from a checkout: the ``simcache`` command (simcache/cli.py)."""

from simcache.cli import main, run  # noqa: F401 (main: the click group)

if __name__ == "__main__":
    run()
