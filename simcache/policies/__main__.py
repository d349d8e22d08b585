"""``python -m simcache.policies`` prints the policy tables of docs/metrics.md."""

from simcache.policies import markdown_tables

if __name__ == "__main__":
    print(markdown_tables(), end="")
