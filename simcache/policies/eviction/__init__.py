"""Eviction rules: which unpinned resident gives up its slot."""
