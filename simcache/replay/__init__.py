"""Replay simulator decisions on a GPU with real-shaped expert tensors, and probe a GPU's
transfer and compute speeds for the timing model. Needs torch."""

# declared here, without torch, so the CLI's options can name them before torch is imported
ISSUE_PATHS = ("eager", "fast")  # simcache.replay.issue.ISSUERS
QUANTISED = ("int4", "fp8")  # simcache.replay.experts: --expert-dtype formats
