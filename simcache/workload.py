"""From a trace to cache accesses (docs/design.md §3).

Continuous batching turns tokens into *steps*; each (step, layer) demands the distinct experts
its tokens chose, with the number of tokens routed to each. One *access* is one (step, layer,
distinct expert). Accesses are laid out flat, step-major then layer, experts ascending inside a
(step, layer) *group*; ``group_ptr`` delimits the groups. Keys are ``layer * E + expert``.

A missing record (expert id -1: a gap or padding, trace schema 1.1) demands nothing.

Future knowledge (``next_use``) is computed once here, in one backward pass, so that Belady and
the oracle admission are a few lines each.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from simcache import _checks
from simcache._jit import jit
from simcache.errors import SimcacheError
from simcache.trace import Trace

PREFILL_MODES = ("skip", "step")
RECORDED = "recorded"  # batch=RECORDED: the engine's recorded forward passes are the steps


@dataclass(frozen=True, eq=False)
class Steps:
    """Which tokens run together.

    Attributes
    ----------
    step_ptr : int64 (steps + 1,)
        Step s holds ``step_tokens[step_ptr[s]:step_ptr[s+1]]``.
    step_tokens : int64 (processed tokens,)
        Token indices (rows of ``Trace.token_experts()``).
    decode_tokens : int
        Tokens processed in decode steps (the denominator of time per token).
    request_ptr : int64 (requests + 1,)
        Request r owns tokens ``request_ptr[r]:request_ptr[r+1]``.
    request_first : int64 (requests,)
        Its first processed token (its first token, or its first decode token when prefill
        is skipped).
    """

    step_ptr: np.ndarray
    step_tokens: np.ndarray
    decode_tokens: int
    request_ptr: np.ndarray
    request_first: np.ndarray

    @property
    def num_steps(self) -> int:
        return self.step_ptr.shape[0] - 1

    @functools.cached_property
    def token_prev(self) -> np.ndarray:
        """int64 (tokens,): the previous processed token of the same request, or -1 (the
        Markov learner's input; computed on first use)."""
        t = np.arange(self.request_ptr[-1], dtype=np.int64)
        first = np.repeat(self.request_first, np.diff(self.request_ptr))
        return np.where(t > first, t - 1, -1)


@dataclass(frozen=True, eq=False)
class Demand:
    """The access stream.

    Attributes
    ----------
    group_ptr : int64 (steps * layers + 1,)
        Group g = (step g // L, layer g % L) owns accesses ``group_ptr[g]:group_ptr[g+1]``.
    keys : int16 or int32 (accesses,)
        ``layer * E + expert`` (int16 when layers x E < 32768).
    tokens : int16 or int32 (accesses,)
        Tokens of the step routed to that expert (its compute load).
    """

    group_ptr: np.ndarray
    keys: np.ndarray
    tokens: np.ndarray
    num_layers: int
    num_experts: int

    @property
    def num_accesses(self) -> int:
        return int(self.keys.shape[0])


def schedule(trace: Trace, batch: int | str = 1, prefill: str = "skip") -> Steps:
    """Continuous batching of the trace's requests, in request-id order.

    ``batch="recorded"`` uses the forward passes the engine recorded instead (see
    :func:`schedule_recorded`).

    ``batch`` sequences decode together; at each step every active sequence contributes its
    next decode token; a finished sequence is replaced by the next request. With
    ``prefill="step"`` a newly admitted request first runs one step holding all its prompt
    tokens (alone); with ``"skip"`` prompt tokens are not simulated.

    Examples
    --------
    >>> import numpy as np, simcache
    >>> from simcache.workload import schedule
    >>> t = simcache.Trace.from_arrays(np.zeros((5, 1), int), request=[0, 0, 0, 1, 1],
    ...     position=[0, 1, 2, 0, 1], layer=[0] * 5, num_experts=2)
    >>> s = schedule(t, batch=2)
    >>> [s.step_tokens[s.step_ptr[i]:s.step_ptr[i + 1]].tolist() for i in range(s.num_steps)]
    [[0, 3], [1, 4], [2]]
    """
    if isinstance(batch, str) and batch == RECORDED:
        return schedule_recorded(trace, prefill)
    batch = _checks.integer("batch", batch, 1)
    _checks.choice("prefill", prefill, PREFILL_MODES)
    req = trace.token_request()
    phase = trace.token_phase()
    n = req.shape[0]
    starts = np.flatnonzero(np.r_[True, req[1:] != req[:-1]])
    ends = np.r_[starts[1:], n]
    decoding = phase == 1
    if decoding.all():
        prompt_ends = starts
    else:
        prompt_ends = starts + np.add.reduceat(~decoding, starts, dtype=np.int64)
    request_ptr = np.r_[starts, n].astype(np.int64)
    first = starts if prefill == "step" else prompt_ends
    if batch == 1:
        step_ptr, step_tokens = _schedule_one(starts, prompt_ends, decoding, prefill == "step")
        decode = int(np.count_nonzero(decoding))
    else:
        step_ptr, step_tokens, decode = _schedule(
            starts.astype(np.int64), prompt_ends.astype(np.int64), ends.astype(np.int64),
            int(batch), prefill == "step", n,
        )
    return Steps(step_ptr, step_tokens, int(decode), request_ptr, first.astype(np.int64))


def _schedule_one(starts, prompt_ends, decoding, include_prefill):
    """Batch 1 without a loop: requests run one after another, so the processed tokens are
    the trace's tokens in order (all of them, or the decode ones), one step per decode token
    plus one per prompt (``prefill="step"``). Prompt tokens precede decode tokens inside a
    request (the trace's invariant), so ``decoding`` is the phase column."""
    n = decoding.shape[0]
    if include_prefill:
        # a step starts at every decode token and at the first token of every prompt
        step_start = decoding.copy()
        step_start[starts[prompt_ends > starts]] = True
        return np.r_[np.flatnonzero(step_start), n].astype(np.int64), np.arange(n, dtype=np.int64)
    step_tokens = np.arange(n, dtype=np.int64) if decoding.all() else np.flatnonzero(decoding)
    return np.arange(step_tokens.shape[0] + 1, dtype=np.int64), step_tokens.astype(np.int64, copy=False)


@jit
def _schedule(starts, prompt_ends, ends, batch, include_prefill, n_tokens):
    n_req = starts.shape[0]
    step_ptr = np.empty(n_tokens + n_req + 1, np.int64)
    step_tokens = np.empty(n_tokens, np.int64)
    slot_req = np.full(batch, -1, np.int64)
    slot_next = np.zeros(batch, np.int64)
    nxt = 0
    n_steps = 0
    n_out = 0
    decode = 0
    step_ptr[0] = 0
    while True:
        # admit new requests into free slots, in request order
        for b in range(batch):
            while slot_req[b] < 0 and nxt < n_req:
                r = nxt
                nxt += 1
                if include_prefill and prompt_ends[r] > starts[r]:
                    for t in range(starts[r], prompt_ends[r]):
                        step_tokens[n_out] = t
                        n_out += 1
                    n_steps += 1
                    step_ptr[n_steps] = n_out
                if prompt_ends[r] < ends[r]:
                    slot_req[b] = r
                    slot_next[b] = prompt_ends[r]
        active = 0
        for b in range(batch):
            r = slot_req[b]
            if r < 0:
                continue
            t = slot_next[b]
            step_tokens[n_out] = t
            n_out += 1
            active += 1
            slot_next[b] = t + 1
            if t + 1 >= ends[r]:
                slot_req[b] = -1
        if active == 0:
            break
        decode += active
        n_steps += 1
        step_ptr[n_steps] = n_out
    return step_ptr[: n_steps + 1].copy(), step_tokens[:n_out].copy(), decode


def schedule_recorded(trace: Trace, prefill: str = "skip") -> Steps:
    """The steps an engine actually ran: tokens grouped by the trace's ``step`` column (the
    recorded forward pass), passes in recorded order, tokens of a pass in trace order.

    With ``prefill="skip"`` prefill tokens are left out (a pass holding only prefill tokens
    disappears); with ``"step"`` they stay where the engine ran them, beside decode tokens
    of the same pass (SGLang's mixed chunked prefill).

    Examples
    --------
    >>> import numpy as np, simcache
    >>> t = simcache.Trace.from_arrays(np.zeros((4, 1), int), request=[0, 0, 1, 1],
    ...     position=[0, 1, 0, 1], layer=[0] * 4, step=[0, 1, 0, 2], num_experts=2)
    >>> s = schedule_recorded(t)
    >>> [s.step_tokens[s.step_ptr[i]:s.step_ptr[i + 1]].tolist() for i in range(s.num_steps)]
    [[0, 2], [1], [3]]
    """
    if prefill not in PREFILL_MODES:
        raise SimcacheError(f"prefill must be one of {', '.join(PREFILL_MODES)}, got {prefill!r}")
    if trace.step is None:
        raise SimcacheError(
            "--batch recorded needs the recorded forward passes (a 'step' column, as an SGLang "
            "per_token dump gives); this trace has none"
        )
    step = trace.step[:: trace.num_layers].astype(np.int64)
    phase = trace.token_phase()
    keep = np.ones(step.shape[0], np.bool_) if prefill == "step" else phase == 1
    tokens = np.flatnonzero(keep)
    order = tokens[np.argsort(step[tokens], kind="stable")]
    s = step[order]
    bounds = np.flatnonzero(np.r_[True, s[1:] != s[:-1]]) if order.size else np.zeros(0, np.int64)
    step_ptr = np.r_[bounds, order.size].astype(np.int64)
    # requests as schedule() gives them: prompt tokens precede decode tokens in a request, so
    # its processed tokens run from its first one (first token, or first decode token) to its end
    req = trace.token_request()
    n = req.shape[0]
    starts = np.flatnonzero(np.r_[True, req[1:] != req[:-1]])
    first = starts if prefill == "step" else starts + np.add.reduceat(phase == 0, starts, dtype=np.int64)
    return Steps(step_ptr, np.ascontiguousarray(order, np.int64), int((phase[order] == 1).sum()),
                 np.r_[starts, n].astype(np.int64), first.astype(np.int64))


def demand(trace: Trace, steps: Steps) -> Demand:
    """The access stream of ``steps`` over ``trace`` (see module docstring).

    Expert ids below 0 are not accesses: -1 marks a row with no record and pads a row after
    its real ids. When every step holds one token (batch 1) a group is that token's row, so
    the stream is a sort of the rows; otherwise one pass over the steps builds it.
    """
    L, E = trace.num_layers, trace.num_experts
    experts = trace.token_experts()
    # the narrowest types that hold every key and token count: half the memory of int32 on
    # typical models (layers x experts < 32768, steps under 32768 tokens)
    int16_max = np.iinfo(np.int16).max
    key_type = np.int16 if L * E <= int16_max else np.int32
    if steps.step_tokens.shape[0] == steps.num_steps:
        return _demand_one_token(experts, steps.step_tokens, L, E, key_type)
    biggest_step = int(np.diff(steps.step_ptr).max())
    token_type = np.int16 if biggest_step <= int16_max else np.int32
    sizes = np.diff(steps.step_ptr)
    bound = int(np.minimum(sizes * experts.shape[2], E).sum()) * L
    group_ptr = np.empty(steps.num_steps * L + 1, np.int64)
    keys = np.empty(bound, key_type)
    tokens = np.empty(bound, token_type)
    n = _fill_groups(steps.step_ptr, steps.step_tokens, experts, E, group_ptr, keys, tokens)
    return Demand(group_ptr, keys[:n].copy(), tokens[:n].copy(), L, E)


def _demand_one_token(experts, step_tokens, L, E, key_type) -> Demand:
    """One token per step: a group is that token's row at that layer, ascending, ids < 0
    dropped. Top-1 without gaps is the expert column itself plus layer offsets; otherwise
    one numba pass sorts each row (insertion sort of k entries)."""
    n_steps = step_tokens.shape[0]
    k = experts.shape[2]
    all_tokens = n_steps == experts.shape[0]
    if k == 1 and int(experts.min(initial=0)) >= 0:
        rows = experts if all_tokens else experts[step_tokens]
        if L == 1 and rows.dtype == key_type:
            keys = np.ascontiguousarray(rows.reshape(-1))
        else:
            offset = (np.arange(L, dtype=key_type) * E)[:, None]
            keys = (rows.astype(key_type, copy=False) + offset).reshape(-1)
        group_ptr = np.arange(keys.shape[0] + 1, dtype=np.int64)
    else:
        keys = np.empty(n_steps * L * k, key_type)
        group_ptr = np.empty(n_steps * L + 1, np.int64)
        n = _sort_rows(experts, step_tokens, all_tokens, E, keys, group_ptr)
        keys = keys[:n] if n < keys.shape[0] else keys
    return Demand(group_ptr, keys, np.ones(keys.shape[0], np.int16), L, E)


@jit
def _sort_rows(experts, step_tokens, all_tokens, E, keys, group_ptr):
    L = experts.shape[1]
    k = experts.shape[2]
    n = 0
    group_ptr[0] = 0
    g = 0
    for s in range(step_tokens.shape[0]):
        t = s if all_tokens else step_tokens[s]
        for l in range(L):
            lo = n
            for r in range(k):
                e = experts[t, l, r]
                if e < 0:
                    continue
                v = l * E + e
                b = n - 1
                while b >= lo and keys[b] > v:
                    keys[b + 1] = keys[b]
                    b -= 1
                keys[b + 1] = v
                n += 1
            g += 1
            group_ptr[g] = n
    return n


@jit
def _fill_groups(step_ptr, step_tokens, experts, E, group_ptr, keys, tokens):
    """One pass over the steps: each group's distinct experts (ids >= 0), ascending, with
    their token counts. Returns the number of accesses written."""
    n_steps = step_ptr.shape[0] - 1
    L = experts.shape[1]
    k = experts.shape[2]
    count = np.zeros(E, np.int32)
    seen = np.full(E, -1, np.int64)
    lo = 0
    group_ptr[0] = 0
    for s in range(n_steps):
        for l in range(L):
            g = s * L + l
            c = 0
            for j in range(step_ptr[s], step_ptr[s + 1]):
                t = step_tokens[j]
                for r in range(k):
                    e = experts[t, l, r]
                    if e < 0:
                        continue
                    if seen[e] != g:
                        seen[e] = g
                        count[e] = 0
                        keys[lo + c] = e
                        c += 1
                    count[e] += 1
            # experts ascending inside the group: insertion sort for small groups, a scan of
            # all E for large ones (prefill steps)
            if c * c <= 4 * E:
                for a in range(lo + 1, lo + c):
                    v = keys[a]
                    b = a - 1
                    while b >= lo and keys[b] > v:
                        keys[b + 1] = keys[b]
                        b -= 1
                    keys[b + 1] = v
            else:
                c2 = 0
                for e in range(E):
                    if seen[e] == g:
                        keys[lo + c2] = e
                        c2 += 1
            for a in range(lo, lo + c):
                e = keys[a]
                tokens[a] = count[e]
                keys[a] = l * E + e
            lo += c
            group_ptr[g + 1] = lo
    return lo


def next_use(keys: np.ndarray, num_keys: int) -> np.ndarray:
    """Index of the next access to the same key, for every access.

    An access with no later access gets ``2 * n - i`` (n = number of accesses): larger than
    any real index, and larger for earlier accesses, so among residents never used again the
    least recently used one looks farthest; a value >= n means "never again".

    Examples
    --------
    >>> import numpy as np
    >>> next_use(np.array([3, 1, 3, 1, 2], np.int32), 4).tolist()
    [2, 3, 8, 7, 6]
    """
    return _next_use(keys, num_keys)


@jit
def _next_use(keys, num_keys):
    n = keys.shape[0]
    out = np.empty(n, np.int64)
    last = np.full(num_keys, -1, np.int64)
    for i in range(n - 1, -1, -1):
        key = keys[i]
        out[i] = last[key] if last[key] >= 0 else 2 * n - i
        last[key] = i
    return out


def step_pairs(steps: Steps):
    """Per step, the (previous token, token) pairs of the same request: Markov learning input.

    Returns ``pair_ptr`` (steps + 1), ``pair_prev`` and ``pair_cur`` (token indices).
    """
    tok = steps.step_tokens
    prev = steps.token_prev[tok]
    has = prev >= 0
    counts = np.add.reduceat(has.astype(np.int64), steps.step_ptr[:-1]) if tok.size else np.zeros(0, np.int64)
    # reduceat on empty trailing segments is not an issue: every step holds at least one token
    pair_ptr = np.zeros(steps.num_steps + 1, np.int64)
    np.cumsum(counts, out=pair_ptr[1:])
    return pair_ptr, np.ascontiguousarray(prev[has]), np.ascontiguousarray(tok[has])


def future_order(d: Demand) -> np.ndarray:
    """For every access, the rank of its key's next use in Belady's order (docs/design.md §4, with
    pinning): larger = needed later.

    Two keys whose next uses fall in the same (step, layer) are both needed then, and pinning
    means the one kept cannot be swapped for the other during that step; so ties between
    next uses in one group are broken by the use after that, and so on: the rank orders the
    *sequence* of groups in which a key is used again, lexicographically (with "never again"
    after every group). Keys whose whole future is identical are ordered by the position of
    their last use. An access with no later use gets ``2 * n - i`` as in :func:`next_use`, so
    residents never needed again rank farthest, the least recently used first.

    Examples
    --------
    Step 0 demands {0, 1}; step 1 demands {0, 1} again; after that only 1 returns (step 2).
    Both next uses fall in step 1, so the use after decides: key 1 is needed sooner.

    >>> import numpy as np
    >>> d = Demand(np.array([0, 2, 4, 5]), np.array([0, 1, 0, 1, 1], np.int32),
    ...            np.ones(5, np.int32), 1, 2)
    >>> r = future_order(d)
    >>> bool(r[0] > r[1])
    True
    """
    n = d.keys.shape[0]
    out = next_use(d.keys, d.num_layers * d.num_experts)
    _rank_in_place(d.group_ptr, out, n)
    return out


@jit
def _rank_in_place(group_ptr, nxt, n):
    """Turn next-use indices into ranks of the future use sequence (see future_order)."""
    rank = np.empty(n, np.int64)
    n_groups = group_ptr.shape[0] - 1
    r = n
    big = 4 * n  # "never again", above every rank
    order = np.empty(max(1, int(np.max(np.diff(group_ptr))) if n_groups > 0 else 1), np.int64)
    value = np.empty(order.shape[0], np.int64)
    for g in range(n_groups - 1, -1, -1):
        lo = group_ptr[g]
        hi = group_ptr[g + 1]
        m = hi - lo
        # sort the group's accesses by (rank of their next use, position): insertion sort
        for a in range(m):
            j = lo + a
            v = rank[nxt[j]] if nxt[j] < n else big
            b = a - 1
            while b >= 0 and (value[b] > v or (value[b] == v and order[b] > j)):
                value[b + 1] = value[b]
                order[b + 1] = order[b]
                b -= 1
            value[b + 1] = v
            order[b + 1] = j
        for a in range(m - 1, -1, -1):
            r -= 1
            rank[order[a]] = r
    for i in range(n):
        if nxt[i] < n:
            nxt[i] = rank[nxt[i]]


# ---- the prepared workload ---------------------------------------------------------------


class Workload:
    """A trace scheduled for one batch size and prefill mode, with its access stream.

    Built once and reused across policies and capacities (:func:`simulate` accepts it in place
    of a trace). Future order and the Markov learner's inputs are computed on first need.
    """

    def __init__(self, trace: Trace, batch: int | str = 1, prefill: str = "skip"):
        self.trace = _checks.instance("trace", trace, Trace, "Trace (simcache.read_trace)")
        self.batch = int(batch) if isinstance(batch, (int, np.integer)) else batch
        self.prefill = prefill
        self.steps: Steps = schedule(trace, batch, prefill)
        self.demand: Demand = demand(trace, self.steps)
        if self.demand.num_accesses == 0:
            raise SimcacheError(
                "no accesses to simulate: every token is prefill and prefill is skipped "
                "(use --prefill step)"
            )

    @functools.cached_property
    def future(self) -> np.ndarray:
        """Belady's order of every access's next use (:func:`simcache.workload.future_order`)."""
        return future_order(self.demand)

    @functools.cached_property
    def pairs(self):
        """(pair_ptr, pair_prev, pair_cur): the Markov learner's consecutive-token pairs."""
        return step_pairs(self.steps)

    @functools.cached_property
    def max_tokens(self) -> int:
        """Most tokens any expert gets in one (step, layer)."""
        return int(self.demand.tokens.max())

    @functools.cached_property
    def top1(self) -> np.ndarray:
        """Top-1 expert of every token and layer, (tokens, layers)."""
        return np.ascontiguousarray(self.trace.token_experts()[:, :, 0])
