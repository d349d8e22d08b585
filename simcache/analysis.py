"""Routing locality and the structure of expert transitions, each against a null model
(docs/design.md §8).

For every MoE layer:

* **locality** of consecutive tokens of the same sequence: the top-1 repeat rate (random
  baseline 1/E) and the rate at which their top-k sets overlap at all (random baseline
  1 - C(E-k, k) / C(E, k));
* the **top-1 transition matrix** P (counts row-normalised; an expert never seen as a source
  keeps an all-zero row, reported in ``zero_rows``), its stationary distribution, and
  ``1 - |lambda_2(P)|``, the quantity the write-up's code calls the spectral gap;
* the **Fiedler value** of the normalised Laplacian of the symmetrised transition graph (the
  write-up's "Laplacian lambda_2": near 0 means near-disconnected communities);
* **strongly connected components** of the graph of transitions with P >= ``cut``;
* **spectral communities** (number chosen by the largest eigengap of the normalised
  Laplacian, k-means on its eigenvectors) and their Newman modularity;
* expert **load balance** (max / mean use, coefficient of variation).

Every statistic is recomputed under a null model — for a trace, token positions shuffled
within each sequence (destroying order, keeping each sequence's experts); for a count array, each
row redrawn as a multinomial with the same row sum from the column marginals (destroying the
dependence of the next expert on the current one) — and reported as the null's mean and 95%
interval, so a reader can tell structure from sampling noise.

Missing records (trace schema 1.1) are skipped: a pair of consecutive tokens counts at layer l
only when both have a record there (a transition across a gap is not a transition), -1 padding
never overlaps, and each layer reports the pairs it skipped (``skipped_gap_pairs``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from math import comb
from pathlib import Path
from typing import Any, Callable

import numpy as np

from simcache import _checks
from simcache.errors import SimcacheError
from simcache.trace import Trace

STATS = ("repeat_top1", "overlap_any", "one_minus_abs_lambda2", "fiedler", "scc_count",
         "communities", "modularity")


@dataclass
class Analysis:
    """Per-layer statistics with their null intervals (see the module docstring)."""

    source: str
    kind: str  # "trace" or "counts"
    num_layers: int
    num_experts: int
    top_k: int | None
    null_samples: int
    cut: float
    layers: list[dict[str, Any]]
    counts: np.ndarray  # (L, E, E) observed transition counts
    domains: dict[str, Any] = field(default_factory=dict)

    def overall(self) -> dict[str, Any]:
        """Layer means of every statistic and of its null mean and interval."""
        out: dict[str, Any] = {"layers": self.num_layers}
        for name in STATS + ("repeat_top1_random", "overlap_any_random", "load_max_over_mean"):
            values = [rec[name] for rec in self.layers if rec.get(name) is not None]
            out[name] = float(np.mean(values)) if values else None
            nulls = [rec.get(name + "_null") for rec in self.layers if rec.get(name + "_null")]
            if nulls:
                out[name + "_null"] = {k: float(np.mean([n[k] for n in nulls])) for k in ("mean", "lo", "hi")}
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "kind": self.kind,
            "num_layers": self.num_layers,
            "num_experts": self.num_experts,
            "top_k": self.top_k,
            "null_samples": self.null_samples,
            "cut": self.cut,
            "overall": self.overall(),
            "layers": self.layers,
            "domains": self.domains,
        }


# ---- entry points ---------------------------------------------------------------------------


def analyze(source, *, null_samples: int = 20, seed: int = 0, cut: float = 0.05,
            max_communities: int = 8, estimate: Callable[[float], None] | None = None) -> Analysis:
    """Analyse a :class:`Trace`, a trace path, a ``.npy`` count array path, or an array
    (layers, E, E) of top-1 transition counts.

    ``estimate``, if given, is called once with the seconds the null samples still need,
    measured on the first of them (the command line warns when that is long).

    Examples
    --------
    A two-community chain (experts 0-1 and 2-3, rarely crossing) shows a Fiedler value near 0
    and recovers both communities:

    >>> import numpy as np
    >>> block = np.array([[40, 40, 1, 0], [40, 40, 0, 1], [1, 0, 40, 40], [0, 1, 40, 40]])
    >>> a = analyze(block[None].astype(float), null_samples=5)
    >>> rec = a.layers[0]
    >>> rec["communities"], rec["fiedler"] < 0.05
    (2, True)
    """
    _check_args(null_samples, seed, cut)
    est = estimate or (lambda seconds: None)
    if isinstance(source, Trace):
        return _analyze_trace(source, "trace", null_samples, seed, cut, max_communities, est)
    if isinstance(source, np.ndarray):
        return _analyze_counts(source, "array", null_samples, seed, cut, max_communities, est)
    path = Path(source)
    if path.suffix == ".npy":
        from simcache.transitions import load_counts

        return _analyze_counts(load_counts(path), str(path), null_samples, seed, cut, max_communities, est)
    from simcache.trace import read_trace

    return _analyze_trace(read_trace(path), str(path), null_samples, seed, cut, max_communities, est)


MAX_NULL_SAMPLES = 10_000  # each sample recomputes every statistic: 20-200 is typical


def _check_args(null_samples, seed, cut):
    _checks.integer("null samples", null_samples, 0, MAX_NULL_SAMPLES)
    _checks.integer("seed", seed, 0, _checks.UINT64_MAX)
    if not (0.0 < _checks.number("cut", cut) <= 1.0):
        raise SimcacheError(f"cut must be in (0, 1], got {cut}")


def _analyze_counts(counts, source, null_samples, seed, cut, max_communities, estimate) -> Analysis:
    counts = np.asarray(counts)
    if counts.ndim != 3 or counts.shape[1] != counts.shape[2]:
        raise SimcacheError(f"{source}: a count array must have shape (layers, E, E), got {counts.shape}")
    counts = _checks.counts(f"{source}: counts", counts)
    empty = np.flatnonzero(counts.sum(axis=(1, 2)) == 0)
    if empty.size:
        raise SimcacheError(f"{source}: layer {int(empty[0])} has no transitions (all-zero matrix)")
    L, E, _ = counts.shape
    rng = np.random.default_rng(seed)
    layers = []
    for l in range(L):
        C = counts[l]
        rec = {"layer": l, "transitions": float(C.sum())}
        rec.update(_graph_stats(C, cut, max_communities, rng))
        rec["repeat_top1"] = float(np.trace(C) / C.sum())
        rec["repeat_top1_random"] = 1.0 / E
        rec["overlap_any"] = None
        rec["overlap_any_random"] = None
        src = C.sum(axis=1)
        rec["load_max_over_mean"] = float(src.max() / src.mean())
        rec["load_cv"] = float(src.std() / src.mean())
        samples = []
        start = time.perf_counter()
        for i in range(null_samples):
            N = _null_counts(C, rng)
            s = _graph_stats(N, cut, max_communities, rng)
            s["repeat_top1"] = float(np.trace(N) / N.sum()) if N.sum() else 0.0
            samples.append(s)
            if l == 0 and i == 0:
                estimate((time.perf_counter() - start) * (L * null_samples - 1))
        _attach_nulls(rec, samples)
        layers.append(rec)
    return Analysis(source, "counts", L, E, None, null_samples, cut, layers, counts)


def _analyze_trace(trace: Trace, source, null_samples, seed, cut, max_communities, estimate) -> Analysis:
    L, E, k = trace.num_layers, trace.num_experts, trace.top_k
    experts = trace.token_experts()
    req = trace.token_request()
    pos = trace.token_position()
    pair = (req[1:] == req[:-1]) & (pos[1:] == pos[:-1] + 1)
    if not pair.any():
        raise SimcacheError(f"{source}: no two consecutive tokens in any sequence (one token per sequence?)")
    rng = np.random.default_rng(seed)
    starts = np.flatnonzero(np.r_[True, req[1:] != req[:-1]])
    observed = _trace_layer_stats(experts, pair, E, cut, max_communities, rng)
    null_runs = []
    for i in range(null_samples):
        start = time.perf_counter()
        order = _shuffle_within(starts, req.shape[0], rng)
        null_runs.append(_trace_layer_stats(experts[order], pair, E, cut, max_communities, rng))
        if i == 0:
            estimate((time.perf_counter() - start) * (null_samples - 1))
    overlap_random = 1.0 - comb(E - k, k) / comb(E, k) if E - k >= k else 1.0
    use = np.zeros((L, E), np.int64)
    for l in range(L):
        ids = experts[:, l, :].ravel()
        use[l] = np.bincount(ids[ids >= 0], minlength=E)
    layers = []
    for l in range(L):
        rec = {"layer": l, **observed[l]}
        rec["repeat_top1_random"] = 1.0 / E
        rec["overlap_any_random"] = overlap_random
        rec["load_max_over_mean"] = float(use[l].max() / use[l].mean())
        rec["load_cv"] = float(use[l].std() / use[l].mean())
        rec["unused_experts"] = int((use[l] == 0).sum())
        _attach_nulls(rec, [run[l] for run in null_runs])
        layers.append({k_: v for k_, v in rec.items() if k_ != "counts"})
    counts = np.stack([observed[l]["counts"] for l in range(L)])
    a = Analysis(source, "trace", L, E, k, null_samples, cut, layers, counts)
    if trace.domain is not None and trace.domains:
        a.domains = domain_use(trace)
    return a


# ---- statistics -----------------------------------------------------------------------------


def _shuffle_within(starts, n, rng):
    """A permutation of token indices that shuffles positions inside each sequence."""
    seg = np.repeat(np.arange(starts.size), np.diff(np.r_[starts, n]))
    return np.lexsort((rng.random(n), seg))


def _trace_layer_stats(experts, pair, E, cut, max_communities, rng):
    """Locality and graph statistics of every layer, vectorised over layers."""
    L, k = experts.shape[1], experts.shape[2]
    idx = np.flatnonzero(pair)
    a = experts[idx]  # (pairs, L, k): the earlier token of each consecutive pair
    b = experts[idx + 1]
    valid = (a[:, :, 0] >= 0) & (b[:, :, 0] >= 0)  # (pairs, L): both tokens have a record
    n = valid.sum(axis=0)
    per = np.maximum(n, 1)
    repeat = ((a[:, :, 0] == b[:, :, 0]) & valid).sum(axis=0) / per
    overlap = np.zeros(valid.shape, np.bool_)
    for i in range(k):
        for j in range(k):
            overlap |= (a[:, :, i] == b[:, :, j]) & (a[:, :, i] >= 0)
    overlap_rate = (overlap & valid).sum(axis=0) / per
    layer_of = np.broadcast_to(np.arange(L, dtype=np.int64)[None, :], valid.shape)
    flat = (layer_of[valid] * E + a[:, :, 0][valid]) * E + b[:, :, 0][valid]
    counts = np.bincount(flat, minlength=L * E * E).reshape(L, E, E).astype(np.float64)
    out = []
    for l in range(L):
        rec = {"transitions": int(n[l]), "skipped_gap_pairs": int(idx.size - n[l]),
               "repeat_top1": float(repeat[l]), "overlap_any": float(overlap_rate[l]),
               "counts": counts[l]}
        rec.update(_graph_stats(counts[l], cut, max_communities, rng))
        out.append(rec)
    return out


def _null_counts(C, rng):
    """Each row redrawn with its own (rounded) sum from the column marginals."""
    col = C.sum(axis=0)
    q = col / col.sum()
    rows = np.rint(C.sum(axis=1)).astype(np.int64)
    return rng.multinomial(rows, q).astype(np.float64)


def transition_matrix(C: np.ndarray):
    """Row-normalised P, keeping all-zero rows at zero (the fork's convention); and the
    number of such rows."""
    rows = C.sum(axis=1, keepdims=True)
    zero = rows[:, 0] == 0
    P = C / np.where(zero[:, None], 1.0, rows)
    return P, int(zero.sum())


TELEPORT = 1e-6


def stationary(P: np.ndarray) -> np.ndarray:
    """Stationary distribution of P, with all-zero rows replaced by uniform jumps and a
    1e-6 uniform teleport, so that it is unique even when the chain is reducible."""
    E = P.shape[0]
    Q = P.copy()
    Q[Q.sum(axis=1) == 0] = 1.0 / E
    Q = (1.0 - TELEPORT) * Q + TELEPORT / E
    w, v = np.linalg.eig(Q.T)
    i = int(np.argmin(np.abs(w - 1.0)))
    pi = np.abs(np.real(v[:, i]))
    return pi / pi.sum()


def one_minus_abs_lambda2(P: np.ndarray) -> float:
    """1 - |lambda_2|, the second-largest eigenvalue modulus of P (the fork's 'spectral gap').

    >>> one_minus_abs_lambda2(np.array([[0.9, 0.1], [0.1, 0.9]]))  # eigenvalues 1 and 0.8
    0.2
    """
    mods = np.sort(np.abs(np.linalg.eigvals(P)))[::-1]
    return round(float(1.0 - mods[1]), 12) if mods.size > 1 else 1.0


def _normalized_laplacian(C: np.ndarray):
    W = C + C.T
    deg = W.sum(axis=1)
    keep = deg > 0
    W = W[np.ix_(keep, keep)]
    d = 1.0 / np.sqrt(deg[keep])
    return np.eye(W.shape[0]) - d[:, None] * W * d[None, :], W, keep


def _graph_stats(C, cut, max_communities, rng):
    from scipy.cluster.vq import kmeans2
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import connected_components

    P, zero_rows = transition_matrix(C)
    Lap, W, keep = _normalized_laplacian(C)
    n = W.shape[0]
    evals, evecs = np.linalg.eigh(Lap) if n else (np.zeros(0), np.zeros((0, 0)))
    fiedler = float(evals[1]) if n > 1 else 0.0
    scc, _ = connected_components(csr_matrix(P >= cut), directed=True, connection="strong")
    # spectral communities: k at the largest eigengap among the first max_communities + 1
    # (k communities <=> the first k eigenvalues are small: take k at the largest gap)
    top = min(max_communities, n - 1)
    n_comm = int(np.argmax(np.diff(evals[: top + 1])) + 1) if top >= 1 else 1
    labels = np.zeros(n, np.int64)
    if n_comm > 1:
        X = evecs[:, :n_comm]
        X = X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)
        _, labels = kmeans2(X, n_comm, minit="++", seed=rng, iter=20)
    full = np.full(C.shape[0], -1, np.int64)
    full[keep] = labels
    return {
        "zero_rows": zero_rows,
        "one_minus_abs_lambda2": one_minus_abs_lambda2(P),
        "fiedler": fiedler,
        "scc_count": int(scc),
        "communities": int(len(np.unique(labels))) if n else 0,
        "community_labels": full.tolist(),
        "modularity": modularity(W, labels),
        "stationary": stationary(P).tolist(),
        "eigenvalue_moduli": np.sort(np.abs(np.linalg.eigvals(P)))[::-1].tolist(),
    }


def modularity(W: np.ndarray, labels: np.ndarray) -> float:
    """Newman's modularity of a partition of a weighted undirected graph."""
    m2 = W.sum()
    if m2 == 0 or np.unique(labels).size < 2:
        return 0.0  # one community: exactly 0, not rounding noise
    k = W.sum(axis=1)
    same = labels[:, None] == labels[None, :]
    return float(((W - np.outer(k, k) / m2) * same).sum() / m2)


def _attach_nulls(rec, samples):
    for name in STATS:
        if rec.get(name) is None:
            continue
        values = np.array([s[name] for s in samples if s.get(name) is not None], float)
        if values.size:
            lo, hi = np.percentile(values, [2.5, 97.5])
            rec[name + "_null"] = {"mean": float(values.mean()), "lo": float(lo), "hi": float(hi)}


def domain_use(trace: Trace) -> dict[str, Any]:
    """Per domain and layer: the share of the domain's tokens that put each expert in their
    top-k (OLMoE's 'domain specialisation'; uniform = k / E)."""
    L, E, k = trace.num_layers, trace.num_experts, trace.top_k
    experts = trace.token_experts()
    dom = trace.token_domain()
    out = {"uniform_share": k / E, "by_domain": {}}
    for code, name in enumerate(trace.domains):
        sel = dom == code
        n = int(sel.sum())
        if not n:
            continue
        shares = []
        for l in range(L):
            ids = experts[sel, l, :].ravel()
            use = np.bincount(ids[ids >= 0], minlength=E) / n
            shares.append(use.tolist())
        shares_arr = np.array(shares)
        out["by_domain"][name] = {
            "tokens": n,
            "max_share_by_layer": shares_arr.max(axis=1).tolist(),
            "top_expert_by_layer": shares_arr.argmax(axis=1).tolist(),
            "share": shares,
        }
    return out
