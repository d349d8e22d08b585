"""Top-1 transition counts: the Markov learner's prior and the analysis's raw material."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from simcache import _checks
from simcache._files import check_input
from simcache.errors import SimcacheError
from simcache.trace import Trace


def transition_counts(trace: Trace) -> np.ndarray:
    """Counts T[l, a, b] of consecutive tokens of the same request whose top-1 expert at
    layer l went from a to b. Shape (layers, E, E), float64. A pair where either token has no
    record at layer l (a gap, schema 1.1) is skipped at that layer. Of a *training* trace, this
    is the Markov learner's prior (``simulate(..., prior=transition_counts(train))``).

    >>> import numpy as np, simcache
    >>> t = simcache.Trace.from_arrays(np.array([[0], [1], [1], [0]]), request=[0, 0, 0, 1],
    ...     position=[0, 1, 2, 0], layer=[0] * 4, num_experts=2)
    >>> transition_counts(t)[0].tolist()
    [[0.0, 1.0], [0.0, 1.0]]
    """
    L, E = trace.num_layers, trace.num_experts
    top1 = trace.token_experts()[:, :, 0].astype(np.int64)
    req = trace.token_request()
    pos = trace.token_position()
    consecutive = (req[1:] == req[:-1]) & (pos[1:] == pos[:-1] + 1)
    src = top1[:-1][consecutive]  # (pairs, L)
    dst = top1[1:][consecutive]
    valid = (src >= 0) & (dst >= 0)
    flat = (np.arange(L)[None, :] * E + src) * E + dst
    counts = np.bincount(flat[valid], minlength=L * E * E).astype(np.float64)
    return counts.reshape(L, E, E)


def fit_prior(trace: Trace) -> np.ndarray:
    """A Markov-admission prior: the transition counts of a *training* trace. A trace with
    no two consecutive tokens in any request would give an all-zero prior: an error."""
    counts = transition_counts(trace)
    if not counts.any():
        raise SimcacheError(
            f"the prior would be empty: the {trace.num_requests:,} training requests have no two "
            f"consecutive tokens"
        )
    return counts


def load_counts(path) -> np.ndarray:
    """A ``.npy`` array of transition counts, with a one-line error for a missing or bad file
    (its shape is the caller's to check)."""
    path = check_input(path, "count array")
    try:
        counts = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:  # EOFError: an empty file
        reason = str(exc).splitlines()[0] if str(exc) else "empty file"
        raise SimcacheError(f"{path}: not a numpy array ({reason})") from None
    if not isinstance(counts, np.ndarray):
        raise SimcacheError(f"{path}: an .npz archive, not one .npy array")
    return _checks.counts(f"{path}: counts", counts)


def load_prior(path, num_layers: int, num_experts: int) -> np.ndarray:
    """A prior from a trace file (fitted here) or a ``.npy`` count array (layers, E, E)."""
    from simcache.trace import read_trace

    path = Path(path)
    if path.suffix == ".npy":
        counts = load_counts(path)
    else:
        counts = transition_counts(read_trace(path))
    if counts.shape != (num_layers, num_experts, num_experts):
        raise SimcacheError(
            f"prior {path} has shape {counts.shape}, the trace needs "
            f"({num_layers}, {num_experts}, {num_experts})"
        )
    if not counts.any():
        raise SimcacheError(f"prior {path} holds no transitions (all counts are zero)")
    return np.asarray(counts, np.float64)


def split_requests(trace: Trace, test_fraction: float = 0.5, seed: int = 0) -> tuple[Trace, Trace]:
    """Split by request into (train, test): a seeded random choice of whole requests.

    A policy that learns (a Markov prior) must be fitted on ``train`` and scored on ``test``.
    """
    if not (0.0 < test_fraction < 1.0):
        raise SimcacheError(f"test fraction must be in (0, 1), got {test_fraction}")
    requests = np.unique(trace.request)
    if requests.size < 2:
        raise SimcacheError("a train/test split needs at least two requests")
    rng = np.random.default_rng(seed)
    n_test = int(round(test_fraction * requests.size))
    n_test = min(max(n_test, 1), requests.size - 1)
    test = np.sort(rng.choice(requests, size=n_test, replace=False))
    train = np.setdiff1d(requests, test)
    return trace.select_requests(train), trace.select_requests(test)
