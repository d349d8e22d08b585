"""Admission rules: whether a missed expert may take a cache slot or is streamed past it."""
