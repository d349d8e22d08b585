"""Synthetic routing traces at scale, from Markov chains or a seeded parametric model.

Two generators share one shape: ``num_requests`` sequences of given lengths, ``top_k``
distinct experts per token and layer, highest gate first, and gate weights that sum to 1.

* **Transition counts** (``transitions=``, shape (layers, E, E), e.g. the fork's matrices):
  per layer the top-1 expert walks the row-normalised chain (a row with no counts jumps
  uniformly); the first token draws from the chain's source frequencies. The other k-1 experts
  are drawn without replacement by expert popularity (column sums).
* **Parametric** (default): per layer E experts split into ``communities``; a sequence stays in
  its community with probability ``stickiness`` per token and otherwise jumps to a uniform one.
  Inside a community, popularity follows Zipf(``zipf``); with probability ``noise`` each pick is
  instead uniform over all experts.
"""

from __future__ import annotations

import numpy as np

from simcache._jit import jit
from simcache import _checks
from simcache.errors import SimcacheError
from simcache.timing import MIXTRAL_EXPERT_BYTES
from simcache.trace import INT16_MAX, INT32_MAX, Trace


def synth(
    num_requests: int = 64,
    length: int | tuple[int, int] = 256,
    *,
    num_layers: int = 32,
    num_experts: int = 8,
    top_k: int = 2,
    transitions=None,
    communities: int | None = None,
    stickiness: float = 0.9,
    zipf: float = 1.0,
    noise: float = 0.1,
    prompt_length: int = 0,
    weights: bool = True,
    seed: int = 0,
    expert_bytes: int | None = MIXTRAL_EXPERT_BYTES,
    model: str = "synthetic",
) -> Trace:
    """Draw a synthetic routing trace.

    Parameters
    ----------
    num_requests : int
    length : int or (lo, hi)
        Tokens per request: fixed, or uniform on [lo, hi].
    num_layers, num_experts, top_k : int
        Ignored for layers/experts when ``transitions`` is given (its shape decides).
    transitions : array (layers, E, E) or path to ``.npy``, optional
        Top-1 transition counts to walk.
    communities, stickiness, zipf, noise : parametric model (see module docstring).
    prompt_length : int
        The first tokens of each request are marked prefill (phase 0).
    weights : bool
        Also draw gate weights (omit to save memory on huge traces).
    seed : int
    expert_bytes : int, optional
        Stored in the metadata for the timing model; default: a Mixtral-8x7B bf16 expert.

    Examples
    --------
    >>> t = synth(4, 16, num_layers=2, num_experts=8, top_k=2, seed=1)
    >>> t.num_tokens, t.top_k, int(t.experts.max()) < 8
    (64, 2, True)
    """
    num_requests = _checks.integer("num_requests", num_requests, 1, INT32_MAX)
    seed = _checks.integer("seed", seed, 0, _checks.UINT64_MAX)
    prompt_length = _checks.integer("prompt_length", prompt_length, 0)
    _checks.optional_integer("expert_bytes", expert_bytes, 1, _checks.EXACT_FLOAT_MAX)
    weights = _checks.flag("weights", weights)
    rng = np.random.default_rng(seed)
    if isinstance(length, (tuple, list)):
        if len(length) != 2:
            raise SimcacheError(f"length must be N or (lo, hi), got {length!r}")
        lo = _checks.integer("length lo", length[0], 1, INT32_MAX)
        hi = _checks.integer("length hi", length[1], lo, INT32_MAX)
        lengths = rng.integers(lo, hi + 1, size=num_requests)
    else:
        lengths = np.full(num_requests, _checks.integer("length", length, 1, INT32_MAX))
    lengths = lengths.astype(np.int64)
    if transitions is not None:
        if isinstance(transitions, str) or hasattr(transitions, "__fspath__"):
            from simcache.transitions import load_counts

            transitions = load_counts(transitions)
        counts = np.asarray(transitions)
        if counts.ndim != 3 or counts.shape[1] != counts.shape[2]:
            raise SimcacheError(f"transitions must have shape (layers, E, E), got {counts.shape}")
        counts = _checks.counts("transition counts", counts)
        num_layers, num_experts = counts.shape[0], counts.shape[1]
    num_layers = _checks.integer("num_layers", num_layers, 1, INT16_MAX)
    num_experts = _checks.integer("num_experts", num_experts, 1, INT16_MAX)
    top_k = _checks.integer("top_k", top_k, 1)
    if top_k > num_experts:
        raise SimcacheError(f"top_k must be in [1, num_experts={num_experts}], got {top_k}")
    L, E, k = int(num_layers), int(num_experts), int(top_k)
    seed32 = int(rng.integers(0, 2**31 - 1))
    if transitions is not None:
        chain, start, popularity = _chain_tables(counts)
        experts = _walk_chain(lengths, L, k, chain, start, popularity, seed32)
        source = "transition counts"
    else:
        C = communities if communities is not None else max(1, E // 4)
        C = _checks.integer("communities", C, 1, E)
        stickiness = _checks.number("stickiness", stickiness, 0.0, 1.0)
        noise = _checks.number("noise", noise, 0.0, 1.0)
        zipf = _checks.number("zipf", zipf, 0.0)
        members, member_cdf = _community_tables(L, E, C, zipf, rng)
        experts = _walk_communities(lengths, L, k, E, members, member_cdf, stickiness, noise, seed32)
        source = f"parametric (communities={C}, stickiness={stickiness}, zipf={zipf}, noise={noise})"
    n_tok = int(lengths.sum())
    rows = n_tok * L
    request = np.repeat(np.repeat(np.arange(num_requests, dtype=np.int32), lengths), L)
    pos_tok = np.arange(n_tok) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    position = np.repeat(pos_tok.astype(np.int32), L)
    layer = np.tile(np.arange(L, dtype=np.int16), n_tok)
    phase = np.repeat((pos_tok >= prompt_length).astype(np.int8), L)
    gate = None
    if weights:
        w = -np.sort(-rng.random((rows, k), dtype=np.float32), axis=1) + np.float32(1e-3)
        gate = (w / w.sum(axis=1, keepdims=True)).astype(np.float32)
    meta = {
        "model": model,
        "architecture": "synthetic",
        "num_layers": L,
        "capture": f"synth: {source}, seed={seed}",
    }
    if expert_bytes is not None:
        meta["expert_bytes"] = int(expert_bytes)
    trace = Trace(
        request=request,
        position=position,
        phase=phase,
        layer=layer,
        experts=experts.reshape(rows, k),
        weights=gate,
        metadata={**meta, "num_experts": E, "top_k": k},
    )
    return trace.validated()


def _chain_tables(counts):
    L, E, _ = counts.shape
    rows = counts.sum(axis=2, keepdims=True)
    chain = np.where(rows > 0, counts / np.where(rows > 0, rows, 1), 1.0 / E)
    chain_cdf = np.cumsum(chain, axis=2)
    src = counts.sum(axis=2)
    start = np.where(src.sum(axis=1, keepdims=True) > 0, src, 1.0)
    start_cdf = np.cumsum(start / start.sum(axis=1, keepdims=True), axis=1)
    pop = counts.sum(axis=1) + 1e-3 * counts.sum() / (L * E * E + 1) + 1e-12
    pop_cdf = np.cumsum(pop / pop.sum(axis=1, keepdims=True), axis=1)
    return chain_cdf, start_cdf, pop_cdf


def _community_tables(L, E, C, zipf, rng):
    """Per layer, experts of each community (shuffled) and the Zipf CDF over its members."""
    size = -(-E // C)
    members = np.full((L, C, size), -1, np.int64)
    cdf = np.zeros((L, C, size))
    for l in range(L):
        perm = rng.permutation(E)
        for c in range(C):
            m = perm[c::C]
            members[l, c, : m.size] = m
            w = 1.0 / np.arange(1, m.size + 1) ** zipf
            cdf[l, c, : m.size] = np.cumsum(w / w.sum())
            cdf[l, c, m.size - 1] = 1.0
            cdf[l, c, m.size :] = 2.0  # never drawn
    return members, cdf


@jit
def _draw(cdf):
    u = np.random.random()
    lo, hi = 0, cdf.shape[0] - 1
    while lo < hi:
        mid = (lo + hi) // 2
        if cdf[mid] < u:
            lo = mid + 1
        else:
            hi = mid
    return lo


@jit
def _is_new(out, t, l, r, e):
    """Expert e is not among the first r experts already drawn for (token t, layer l)."""
    for q in range(r):
        if out[t, l, q] == e:
            return False
    return True


@jit
def _fill_rest(out, t, l, k, E, first, cdf):
    """Experts 2..k of a token: distinct draws from ``cdf`` (uniform after many rejections)."""
    out[t, l, 0] = first
    for r in range(1, k):
        tries = 0
        while True:
            e = _draw(cdf) if tries < 64 else np.random.randint(0, E)
            tries += 1
            if _is_new(out, t, l, r, e):
                out[t, l, r] = e
                break


@jit
def _walk_chain(lengths, L, k, chain_cdf, start_cdf, pop_cdf, seed):
    np.random.seed(seed)
    n = lengths.sum()
    E = chain_cdf.shape[1]
    out = np.empty((n, L, k), np.int16)
    t = 0
    for r in range(lengths.shape[0]):
        for p in range(lengths[r]):
            for l in range(L):
                if p == 0:
                    first = _draw(start_cdf[l])
                else:
                    first = _draw(chain_cdf[l, out[t - 1, l, 0]])
                _fill_rest(out, t, l, k, E, first, pop_cdf[l])
            t += 1
    return out


@jit
def _walk_communities(lengths, L, k, E, members, member_cdf, stickiness, noise, seed):
    np.random.seed(seed)
    n = lengths.sum()
    C = members.shape[1]
    out = np.empty((n, L, k), np.int16)
    comm = np.zeros(L, np.int64)
    t = 0
    for r in range(lengths.shape[0]):
        for p in range(lengths[r]):
            for l in range(L):
                if p == 0 or np.random.random() >= stickiness:
                    comm[l] = np.random.randint(0, C)
                c = comm[l]
                for q in range(k):
                    tries = 0
                    while True:
                        if np.random.random() < noise or tries >= 64:
                            e = np.random.randint(0, E)
                        else:
                            e = members[l, c, _draw(member_cdf[l, c])]
                        tries += 1
                        if _is_new(out, t, l, q, e):
                            out[t, l, q] = e
                            break
            t += 1
    return out
