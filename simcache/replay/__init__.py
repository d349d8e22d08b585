"""Replay simulator decisions on a GPU with real-shaped expert tensors, and probe a GPU's
transfer and compute speeds for the timing model. Needs torch."""
