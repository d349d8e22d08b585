"""What to run: the simulator's decisions as a schedule of (step, layer) groups.

Built once, before anything is timed, from the decision log (hit / fill into slot s / bypass
per access). Every group is a run of *computes* (one per demanded expert: hits and experts
served from a prefetch buffer first, in access order, then loaded experts in load order) and
each loaded compute is preceded by one *load* (one copy of one host row into one GPU buffer).
GPU buffers are numbered in one weights tensor: slots first (``pool * capacity + slot``), then
the bypass ring (``n_slots + r``), then the prefetch buffers (``n_slots + ring + b``,
:mod:`simcache.replay.prefetch`).

With hybrid execution (``--miss cpu|auto``, docs/design.md §11) a group's misses the simulator
sent to the host CPU (outcome 4) are its last computes: they have no load and no GPU buffer
(``buffer`` -1); the host executor (:mod:`simcache.replay.cpu`) runs them.

All arrays are flat numpy columns, cut into groups and computes by ``*_ptr`` offsets (CSR), so
the issue paths (:mod:`simcache.replay.issue`) only read them.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from simcache.errors import SimcacheError
from simcache.simulator import BYPASS, CPU, FILL, FORCED_BYPASS, HIT, PREFETCHED


@dataclass(frozen=True)
class Schedule:
    """The replayed groups; G groups, C computes, R (token, expert) routes.

    Attributes
    ----------
    step, layer : (G,) int64
        The group's decode step and MoE layer.
    rows : (G,) int64
        Token rows of the step (the activations the group reads).
    compute_ptr : (G + 1,) int64
        Computes of group g: ``compute_ptr[g]:compute_ptr[g + 1]``.
    hits : (G,) int64
        How many of the group's computes (its first ones) are hits; then come the loads.
    cpu : (G,) int64
        How many of the group's computes (its last ones) run on the host CPU (no load).
    access : (C,) int64
        Index of the compute's access in the decision log.
    buffer : (C,) int64
        Row of the GPU weights tensor the compute reads (and, for a load, writes); -1 for a
        CPU compute.
    store_row : (C,) int64
        Row of the host expert store holding the expert.
    route_ptr : (C + 1,) int64
        Routes of compute c: ``route_ptr[c]:route_ptr[c + 1]``.
    route_token : (R,) int64
        Token row (within the step) of each route.
    route_dest : (R,) int64
        Where the route's output lands: ``token * top_k + position in the token's top-k``.
    route_weight : (R,) float32
        Gate weight of each route.
    top_k : int
    n_slots, ring : int
        Slots and bypass buffers of the weights tensor.
    """

    step: np.ndarray
    layer: np.ndarray
    rows: np.ndarray
    compute_ptr: np.ndarray
    hits: np.ndarray
    cpu: np.ndarray
    access: np.ndarray
    buffer: np.ndarray
    store_row: np.ndarray
    route_ptr: np.ndarray
    route_token: np.ndarray
    route_dest: np.ndarray
    route_weight: np.ndarray
    top_k: int
    n_slots: int
    ring: int

    @property
    def num_groups(self) -> int:
        return int(self.step.shape[0])

    @property
    def num_buffers(self) -> int:
        return self.n_slots + self.ring

    def computes(self, g: int) -> range:
        return range(int(self.compute_ptr[g]), int(self.compute_ptr[g + 1]))

    def loads(self, g: int) -> range:
        """Computes of group g that are loads, in load order."""
        return range(int(self.compute_ptr[g] + self.hits[g]), int(self.compute_ptr[g + 1] - self.cpu[g]))

    def cpu_computes(self, g: int) -> range:
        """Computes of group g that run on the host CPU."""
        return range(int(self.compute_ptr[g + 1] - self.cpu[g]), int(self.compute_ptr[g + 1]))

    def is_load(self) -> np.ndarray:
        """(C,) bool: the compute follows a load."""
        c = np.arange(self.access.shape[0])
        g = np.searchsorted(self.compute_ptr, c, side="right") - 1
        return (c >= self.compute_ptr[g] + self.hits[g]) & (c < self.compute_ptr[g + 1] - self.cpu[g])

    def ring_of(self, c: int) -> int:
        """Bypass buffer of compute c, -1 for a slot."""
        b = int(self.buffer[c])
        return b - self.n_slots if b >= self.n_slots else -1

    def routes(self, c: int) -> slice:
        return slice(int(self.route_ptr[c]), int(self.route_ptr[c + 1]))

    def resident(self) -> Schedule:
        """The same computes with every expert resident on the GPU: buffer = store row, no
        loads, no CPU computes (the reference of ``--verify``; its weights tensor is the whole
        store)."""
        return replace(self, hits=np.diff(self.compute_ptr), cpu=np.zeros_like(self.cpu),
                       buffer=self.store_row.copy(), n_slots=0, ring=0)

    def window(self, g: int, first: int, last: int) -> tuple[int, int]:
        """Lowest and one past the highest buffer of computes first..last-1 of group g."""
        b = self.buffer[first:last]
        return int(b.min()), int(b.max()) + 1


def build_schedule(work, decisions, groups, key_row, *, num_experts: int, capacity: int, scope: str,
                   n_slots: int, ring: int, experts: np.ndarray, weights: np.ndarray,
                   late: np.ndarray | None = None) -> Schedule:
    """The schedule of ``groups`` ((step, layer, lo, hi) in issue order, lo:hi their accesses).

    ``experts`` (tokens, L, k) and ``weights`` (tokens, L, k) are the trace's routing;
    ``key_row`` maps an expert key to its host store row. Bypass buffers are handed out in
    rotation over the whole run. ``late`` (accesses,) bool: hits computed after the group's
    other hits (a prefetch delivered them, :func:`simcache.replay.prefetch.delivered_accesses`).
    """
    d, steps = work.demand, work.steps
    k = experts.shape[2]
    step, layer, rows, hits, cpu = [], [], [], [], []
    compute_ptr = [0]
    access, buffer, store_row = [], [], []
    route_ptr = [0]
    r_tok, r_dest, r_w = [], [], []
    ring_next = 0
    for s, l, lo, hi in groups:
        toks = steps.step_tokens[steps.step_ptr[s]: steps.step_ptr[s + 1]]
        ex = experts[toks, l, :]  # (n, k)
        pool_base = l * capacity if scope == "layer" else 0
        out = decisions.outcome[lo:hi]
        # no copy first: hits, and accesses served from a prefetch buffer (rows after the ring)
        served = (out == HIT) | (out == PREFETCHED)
        after = late[lo:hi] if late is not None else np.zeros(hi - lo, np.bool_)
        order = [lo + i for i in np.flatnonzero(served & ~after)] + [lo + i for i in np.flatnonzero(served & after)]
        n_hits = len(order)
        order += [lo + i for i in np.flatnonzero((out != HIT) & (out != PREFETCHED) & (out != CPU))]
        on_cpu = [lo + i for i in np.flatnonzero(out == CPU)]
        order += on_cpu
        for i in order:
            outcome = decisions.outcome[i]
            if outcome == HIT or outcome == FILL:
                buf = pool_base + int(decisions.slot[i])
            elif outcome == PREFETCHED:
                buf = n_slots + ring + int(decisions.slot[i])
            elif outcome == CPU:
                buf = -1
            else:
                buf = n_slots + ring_next
                ring_next = (ring_next + 1) % ring
            key = int(d.keys[i])
            access.append(i)
            buffer.append(buf)
            store_row.append(key_row[key])
            t, j = np.nonzero(ex == key - l * num_experts)  # (T,), (T,): its tokens, their top-k position
            r_tok.append(t)
            r_dest.append(t * k + j)
            r_w.append(weights[toks[t], l, j])
            route_ptr.append(route_ptr[-1] + t.size)
        step.append(s)
        layer.append(l)
        rows.append(toks.size)
        hits.append(n_hits)
        cpu.append(len(on_cpu))
        compute_ptr.append(len(access))
    cat = (lambda xs, dt: np.concatenate(xs).astype(dt) if xs else np.zeros(0, dt))
    i64 = np.int64
    return Schedule(
        step=np.array(step, i64), layer=np.array(layer, i64), rows=np.array(rows, i64),
        compute_ptr=np.array(compute_ptr, i64), hits=np.array(hits, i64), cpu=np.array(cpu, i64), access=np.array(access, i64),
        buffer=np.array(buffer, i64), store_row=np.array(store_row, i64), route_ptr=np.array(route_ptr, i64),
        route_token=cat(r_tok, i64), route_dest=cat(r_dest, i64), route_weight=cat(r_w, np.float32),
        top_k=int(k), n_slots=int(n_slots), ring=int(ring))


@dataclass(frozen=True)
class GroupedCalls:
    """The fast issue path's two grouped calls per group, from a :class:`Schedule`: call
    ``2 g`` computes group g's hits, call ``2 g + 1`` its loaded experts. P = 2 G calls.

    Attributes
    ----------
    route_ptr : (P + 1,) int64
        Routes of call p (into the arrays below): ``route_ptr[p]:route_ptr[p + 1]``; a group's
        two calls are adjacent, so group g's routes are ``route_ptr[2 g]:route_ptr[2 g + 2]``.
    token, dest, weight : (R,)
        Each route's token row, output position (token * k + top-k position) and gate weight,
        grouped by buffer within a call (a grouped GEMM takes each expert's rows together).
    offs_ptr : (P + 1,) int64
        Offsets of call p: ``offs[offs_ptr[p]:offs_ptr[p + 1]]``.
    offs : int32
        Per call, the cumulative route count after each expert the call reads (relative to
        the call's first route).
    win_lo, win_hi : (P,) int64
        Without ``compact``: the window of the weights tensor the call reads (its lowest to one
        past its highest buffer; offsets cover every buffer in it, empty ones too).
    buffers : int64
        With ``compact`` (quantised experts, gathered before dequantising): the buffers each
        call reads, one per offset.
    """

    route_ptr: np.ndarray
    token: np.ndarray
    dest: np.ndarray
    weight: np.ndarray
    offs_ptr: np.ndarray
    offs: np.ndarray
    win_lo: np.ndarray
    win_hi: np.ndarray
    buffers: np.ndarray


def grouped_calls(sched: Schedule, compact: bool) -> GroupedCalls:
    """The two grouped calls of every group of ``sched`` (see :class:`GroupedCalls`)."""
    route_ptr, offs_ptr, win_lo, win_hi = [0], [0], [], []
    token, dest, weight, offs, buffers = [], [], [], [], []
    for g in range(sched.num_groups):
        loads = sched.loads(g)
        for first, last in ((int(sched.compute_ptr[g]), loads.start), (loads.start, loads.stop)):
            cs = np.arange(first, last)
            cs = cs[np.argsort(sched.buffer[cs], kind="stable")]  # rows grouped by buffer
            counts = sched.route_ptr[cs + 1] - sched.route_ptr[cs]
            r = (np.concatenate([np.arange(sched.route_ptr[c], sched.route_ptr[c + 1]) for c in cs])
                 if cs.size else np.zeros(0, np.int64))
            token.append(sched.route_token[r])
            dest.append(sched.route_dest[r])
            weight.append(sched.route_weight[r])
            if compact or not cs.size:
                lo, hi = 0, cs.size
                ends = np.cumsum(counts)
                buffers.append(sched.buffer[cs])
            else:
                lo, hi = sched.window(g, first, last)
                per = np.zeros(hi - lo, np.int64)
                np.add.at(per, sched.buffer[cs] - lo, counts)
                ends = np.cumsum(per)
            offs.append(ends)
            win_lo.append(lo)
            win_hi.append(hi)
            route_ptr.append(route_ptr[-1] + r.size)
            offs_ptr.append(offs_ptr[-1] + ends.size)
    cat = (lambda xs, dt: np.concatenate(xs).astype(dt) if xs else np.zeros(0, dt))
    i64 = np.int64
    return GroupedCalls(route_ptr=np.array(route_ptr, i64), token=cat(token, i64), dest=cat(dest, i64),
                        weight=cat(weight, np.float32), offs_ptr=np.array(offs_ptr, i64), offs=cat(offs, np.int32),
                        win_lo=np.array(win_lo, i64), win_hi=np.array(win_hi, i64), buffers=cat(buffers, i64))


def most_bypasses(decisions, groups) -> int:
    """The most loads into bypass buffers in any one of ``groups``."""
    most = 0
    for _, _, lo, hi in groups:
        out = decisions.outcome[lo:hi]
        most = max(most, int(np.isin(out, (BYPASS, FORCED_BYPASS)).sum()))
    return most


def check_ring(ring: int) -> None:
    if ring < 1:
        raise SimcacheError("--bypass-buffers must be at least 1")
