"""Prefetch copies in replay: the simulator's prefetch schedule, issued on the copy stream.

Tensor dimensions used in shape comments (as in :mod:`simcache.replay.experts`):
    W = 3 * F * H  elements per expert     S  GPU slots     P  prefetch buffers

The simulator's schedule (docs/prefetch.md) says, for every prefetch it issued: the group
*during which it starts* (``after``), the expert, and its destination - a slot of the cache
pool, or a prefetch buffer when admission refused it. A CUDA stream serves copies in issue
order, so issuing each prefetch on the copy stream right after the demand copies of that group
reproduces the timeline: the demand copies of later groups queue behind it (the copy in flight
completes first), and prefetches that start later are not issued yet (demand overtakes them).

The compute stream waits on a prefetch's event before it computes the expert it delivered
(:meth:`PrefetchIssuer.delivered`), so a late prefetch is measured as stall, as predicted.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from simcache.errors import SimcacheError

SLOT, BUFFER = 0, 1


@dataclass(frozen=True, eq=False)
class Schedule:
    """Issued prefetches in issue order. ``slot`` is the slot inside the key's pool (or -1),
    ``buffer`` the prefetch buffer (or -1); exactly one of the two is set."""

    after: np.ndarray  # (prefetches,) int64: group during which the copy starts
    key: np.ndarray  # (prefetches,) int32: layer * E + expert
    slot: np.ndarray  # (prefetches,) int32
    buffer: np.ndarray  # (prefetches,) int32

    def __post_init__(self):
        n = self.after.shape[0]
        if any(a.shape != (n,) for a in (self.key, self.slot, self.buffer)):
            raise SimcacheError("a prefetch schedule needs after, key, slot and buffer of one length")
        if n and (np.any(np.diff(self.after) < 0) or np.any((self.slot >= 0) == (self.buffer >= 0))):
            raise SimcacheError("a prefetch schedule must be in issue order with one destination each")

    @classmethod
    def from_dict(cls, d: dict) -> "Schedule":
        """From the decision log's ``prefetch`` metadata (lists)."""
        return cls(np.asarray(d["after"], np.int64), np.asarray(d["key"], np.int32),
                   np.asarray(d["slot"], np.int32), np.asarray(d["buffer"], np.int32))

    @property
    def buffers(self) -> int:
        """Prefetch buffers the schedule uses."""
        return int(self.buffer.max()) + 1 if self.buffer.size else 0

    def in_groups(self, groups) -> "Schedule":
        """The prefetches issued during ``groups`` (e.g. the replayed ones)."""
        keep = np.isin(self.after, np.asarray(list(groups), np.int64))
        return Schedule(self.after[keep], self.key[keep], self.slot[keep], self.buffer[keep])


class PrefetchIssuer:
    """Issues a :class:`Schedule` group by group and tells the compute side what to wait on.

    Parameters
    ----------
    schedule : Schedule
    slot_of : callable (key, slot in its pool) -> tensor (W,)
        The GPU slot a prefetch into the cache writes.
    buffers : tensor (P, W)
        Prefetch buffers (at least ``schedule.buffers`` rows).
    source_of : callable key -> tensor (W,)
        The expert's row of the pinned host store.
    stream : torch.cuda.Stream or None
        The copy stream; None copies synchronously (CPU tests).
    timing : bool
        Timing events (for :meth:`copy_seconds`).
    cuda : bool, optional
        Make CUDA events (default: a stream is given); the stream may be set later.
    """

    def __init__(self, schedule: Schedule, slot_of, buffers, source_of, stream=None, timing: bool = True,
                 cuda: bool | None = None):
        import torch

        if buffers.shape[0] < schedule.buffers:
            raise SimcacheError(f"the prefetch schedule uses {schedule.buffers} buffers, {buffers.shape[0]} given")
        self.schedule, self.slot_of, self.buffers, self.source_of = schedule, slot_of, buffers, source_of
        self.stream = stream  # (may be replaced between runs: each issue run has its copy stream)
        n = schedule.after.shape[0]
        self.cuda = stream is not None if cuda is None else cuda  # (events only on CUDA)
        make = (lambda: torch.cuda.Event(enable_timing=timing)) if self.cuda else (lambda: None)
        self.start = [make() for _ in range(n)]
        self.done = [make() for _ in range(n)]
        self._next = 0
        self._writer: dict[tuple[int, int], int] = {}  # destination -> prefetch that wrote it last
        self.issued = 0
        self.issued_ids: list[int] = []  # prefetches issued, in issue order

    def destination(self, j):
        """(what the compute side asks for, the tensor written) of prefetch ``j``: a slot is
        asked for by its key, a buffer by its index."""
        s = self.schedule
        key = int(s.key[j])
        if s.slot[j] >= 0:
            return (SLOT, key), self.slot_of(key, int(s.slot[j]))
        return (BUFFER, int(s.buffer[j])), self.buffers[int(s.buffer[j])]

    def issue_after(self, group: int, before=None) -> int:
        """Issue the prefetches that start during ``group`` (call after its demand copies);
        ``before``, an event the copy stream waits on first (the computes that read what the
        copies overwrite). Returns how many were issued."""
        import torch

        s = self.schedule
        while self._next < s.after.shape[0] and s.after[self._next] < group:
            self._next += 1  # scheduled during a group not replayed
        first = self._next
        while self._next < s.after.shape[0] and s.after[self._next] == group:
            j = self._next
            where, dst = self.destination(j)
            src = self.source_of(int(s.key[j]))
            if self.stream is not None:
                if before is not None and j == first:
                    self.stream.wait_event(before)
                with torch.cuda.stream(self.stream):
                    self.start[j].record()
                    dst.copy_(src, non_blocking=True)
                    self.done[j].record()
            else:
                dst.copy_(src)
            self._writer[where] = j
            self._next += 1
            self.issued += 1
            self.issued_ids.append(j)
        return self._next - first

    def delivered(self, key: int, buffer: int = -1):
        """The event to wait on before computing ``key`` (in its slot, or in ``buffer``) if a
        prefetch delivered it and has not been waited on yet; else None. Returns the
        prefetch's index as well, (event, j), or (None, -1)."""
        dest = (BUFFER, buffer) if buffer >= 0 else (SLOT, int(key))
        j = self._writer.pop(dest, -1)
        if j < 0:
            return None, -1
        return self.done[j], j

    def forget(self, key: int):
        """``key``'s slot was overwritten by a demand fill: no prefetch delivers it any more."""
        self._writer.pop((SLOT, int(key)), None)

    def copy_seconds(self, ids=None) -> np.ndarray:
        """Seconds of the issued prefetch copies ``ids`` (default: all; after a synchronize;
        CUDA only, else zeros)."""
        ids = self.issued_ids if ids is None else list(ids)
        if not self.cuda or not ids:
            return np.zeros(len(ids))
        return np.array([self.start[j].elapsed_time(self.done[j]) / 1e3 for j in ids])


# ---- in the harness ------------------------------------------------------------------------

def replay_schedule(decisions, layers, num_layers: int, num_experts: int, n_groups: int) -> Schedule | None:
    """The simulator's prefetch schedule (``decisions.prefetch_schedule``) as a replay of
    ``layers`` over its first ``n_groups`` groups issues it: the prefetches of experts of the
    replayed layers, started during those groups; None without prefetch. A prefetch of a
    replayed layer's expert started during a layer that is not replayed is refused (the data
    would never reach its slot)."""
    rows = decisions.prefetch_schedule
    if rows is None:
        return None
    L, E = num_layers, num_experts
    after, key = rows[:, 0].astype(np.int64), rows[:, 1].astype(np.int32)
    keep = np.isin(key // E, layers) & (after < n_groups)
    s = Schedule(after[keep], key[keep], rows[keep, 2].astype(np.int32), rows[keep, 3].astype(np.int32))
    bad = ~np.isin(s.after % L, layers)
    if bad.any():
        j = int(np.argmax(bad))
        raise SimcacheError(f"layer {int(s.after[j] % L)}'s groups prefetch experts of layer {int(s.key[j] // E)}: "
                            f"replay layer {int(s.after[j] % L)} too (--layers) or every layer")
    return s


def check_logged(logged: dict | None, decisions) -> None:
    """Raise unless a decision log's prefetch metadata (``meta["prefetch"]`` or None) is the
    schedule this re-simulation issued."""
    have = decisions.prefetch_schedule
    if logged is None and have is None:
        return
    if logged is None or have is None:
        was = "none" if logged is None else f"{logged['predictor']} --prefetch-width {logged['width']}"
        raise SimcacheError(f"the decision log was made with --prefetch {was}: replay it with the same prefetch")
    want = np.array([logged[k] for k in ("after", "key", "slot", "buffer")], np.int64).reshape(4, -1).T
    if want.shape != have.shape or not np.array_equal(want, have):
        raise SimcacheError("this simulation schedules other prefetches than the decision log")


# what the compute side does before a compute (Delivery.wait)
_NOTHING, _SLOT_HIT, _FROM_BUFFER, _FILLED = range(4)


class Delivery:
    """Prefetch in a replay: one :class:`PrefetchIssuer` over the whole replay (warm-up and
    timed groups: a prefetch started during warm-up delivers to timed groups), bound to one
    issue run at a time (its schedule and copy stream). The eager issue path calls
    :meth:`issue` after a group's demand copies and :meth:`wait` before each compute.

    The weights tensor's rows: the cache slots (``pool * capacity + slot``), the bypass ring,
    then the prefetch buffers from row ``first_buffer``.

    Parameters
    ----------
    schedule : Schedule
        From :func:`replay_schedule`.
    weights : tensor (B, Q)
        The GPU weights tensor; host : tensor (N, Q), the pinned store; key_row maps a key to
        its store row.
    decisions : simcache.simulator.Decisions
        The recorded decisions; keys (accesses,) the workload's demanded keys.
    """

    def __init__(self, schedule: Schedule, weights, first_buffer: int, host, key_row, decisions, keys, *,
                 num_layers: int, num_experts: int, capacity: int, per_layer: bool, device):
        import torch

        E = num_experts
        self.base = (lambda key: (key // E) * capacity) if per_layer else (lambda key: 0)
        self.first_buffer, self.L = int(first_buffer), int(num_layers)
        self.issuer = PrefetchIssuer(schedule, lambda key, slot: weights[self.base(key) + slot], weights[first_buffer:],
                                     lambda key: host[key_row[key]], cuda=device.type == "cuda")
        self.device, self.cuda = device, device.type == "cuda"
        self.outcome, self.slot, self.keys = decisions.outcome, decisions.slot, keys
        n = schedule.after.shape[0]
        make = (lambda: torch.cuda.Event(enable_timing=True)) if self.cuda else (lambda: None)
        self.w_before, self.w_after = [make() for _ in range(n)], [make() for _ in range(n)]
        self.waits: list[tuple[int, int]] = []  # (group id, prefetch) of every wait on a prefetch
        self.sched = None

    def rows(self) -> np.ndarray:
        """(prefetches,) the weights row each prefetch writes."""
        s = self.issuer.schedule
        base = np.array([self.base(int(k)) for k in s.key], np.int64)
        return np.where(s.slot >= 0, base + s.slot, self.first_buffer + s.buffer)

    def bind(self, sched, stream) -> None:
        """Follow the issue run of ``sched`` (a :class:`simcache.replay.schedule.Schedule`),
        whose copies go on ``stream`` (None on the CPU). Checks that no prefetch started
        during a group writes a row that group reads (the simulator pins them)."""
        from simcache.simulator import FILL, HIT, PREFETCHED

        self.sched, self.issuer.stream = sched, stream
        gid = sched.step * self.L + sched.layer  # (G,)
        self.gid = gid.tolist()
        self.issued_from, self.waits_from = len(self.issuer.issued_ids), len(self.waits)
        acc = sched.access
        out, keys, slot = self.outcome[acc], self.keys[acc], self.slot[acc]
        code = np.select([out == HIT, out == PREFETCHED, out == FILL], [_SLOT_HIT, _FROM_BUFFER, _FILLED], _NOTHING)
        g_of = np.repeat(gid, np.diff(sched.compute_ptr))  # (C,)
        self.todo = list(zip(code.tolist(), keys.tolist(), slot.tolist(), g_of.tolist()))
        s, rows = self.issuer.schedule, self.rows()
        local = {g: i for i, g in enumerate(self.gid)}
        for j in np.flatnonzero(np.isin(s.after, gid)):
            g = local[int(s.after[j])]
            if rows[j] in sched.buffer[sched.compute_ptr[g]: sched.compute_ptr[g + 1]]:
                raise SimcacheError(f"prefetch {j} overwrites row {rows[j]} while group {int(s.after[j])} reads it")

    def issue(self, g: int, before=None) -> int:
        """After group g's demand copies: the prefetches started during it (``before``: the
        previous group's done event)."""
        return self.issuer.issue_after(self.gid[g], before)

    def wait(self, c: int) -> None:
        """Before compute c: wait on the prefetch that delivered its expert, if one did (its
        slot or its prefetch buffer); a demand fill supersedes an earlier prefetch."""
        code, key, slot, gid = self.todo[c]
        if code == _NOTHING:
            return
        if code == _FILLED:
            self.issuer.forget(key)
            return
        event, j = self.issuer.delivered(key, slot if code == _FROM_BUFFER else -1)
        if j < 0 and code == _FROM_BUFFER:
            raise SimcacheError(f"an access served from prefetch buffer {slot} finds no prefetch of key {key} in it")
        if event is not None:
            import torch

            self.w_before[j].record()
            torch.cuda.current_stream(self.device).wait_event(event)
            self.w_after[j].record()
            self.waits.append((gid, j))

    def measured(self) -> dict:
        """What the bound run issued and waited (after it synchronised): the prefetches it
        issued (ids), their copy seconds, and per group of the run the seconds the compute
        stream waited on prefetches and the prefetches issued."""
        ids = self.issuer.issued_ids[self.issued_from:]
        local = {g: i for i, g in enumerate(self.gid)}
        stall = np.zeros(len(self.gid))
        for g, j in self.waits[self.waits_from:]:
            stall[local[g]] += self.w_before[j].elapsed_time(self.w_after[j]) / 1e3
        per_group = np.zeros(len(self.gid), np.int64)
        after = self.issuer.schedule.after
        for j in ids:
            per_group[local[int(after[j])]] += 1
        return {"ids": ids, "copy_s": self.issuer.copy_seconds(ids), "stall_s": stall, "per_group": per_group}


def predicted_timeline(decisions, work, calibration, expert_bytes: int, group_ids, model: str):
    """Per group of ``group_ids`` (ids step * L + layer, in order): the predicted start, relative
    to the first one's, and the predicted stall (time the GPU waits on copies), in seconds. With
    prefetch they are the copy-engine timeline's (``decisions.group_timeline``); without, the
    same rule (docs/design.md §5: every group starts when the previous one ends, stall = group
    time - compute) from the per-expert FFN table; (None, None) for the grouped FFN model."""
    from simcache.timing import default_calibration

    ids = np.asarray(group_ids, np.int64)
    if ids.size == 0:
        return np.zeros(0), np.zeros(0)
    if decisions.group_timeline is not None:
        start, stall = decisions.group_timeline[ids, 0], decisions.group_timeline[ids, 1]
    elif model == "per-expert":
        cal = calibration if calibration is not None else default_calibration()
        d = work.demand
        lut = cal.ffn_seconds_for(np.arange(work.max_tokens + 1), expert_bytes)
        gp = d.group_ptr
        compute = np.array([sum(lut[d.tokens[gp[g]: gp[g + 1]]].tolist(), 0.0) for g in ids])  # (the kernel's order)
        t = decisions.group_time
        start = (np.cumsum(t) - t)[ids]
        stall = t[ids] - compute
    else:
        return None, None
    return start - start[0], stall


def delivered_accesses(decisions, demand, schedule: Schedule, n_groups: int) -> np.ndarray:
    """(accesses,) bool: over the first ``n_groups`` groups, the accesses whose expert a
    prefetch delivered and that read it first (a hit on a slot a prefetch filled since, or an
    access served from a prefetch buffer): the computes that may wait on a copy in flight. The
    schedule computes them after a group's other hits, as the timeline does (every other
    expert computes while the copy runs; the late one starts when it arrives)."""
    from simcache.simulator import FILL, HIT, PREFETCHED

    out = np.zeros(demand.keys.shape[0], np.bool_)
    outcome, keys, gp = decisions.outcome, demand.keys, demand.group_ptr
    s = schedule
    pending: set[int] = set()  # keys in a slot a prefetch filled, not read since
    j = 0
    for g in range(min(n_groups, gp.shape[0] - 1)):
        for i in range(gp[g], gp[g + 1]):
            o, key = outcome[i], int(keys[i])
            if o == PREFETCHED or (o == HIT and key in pending):
                out[i] = True
                pending.discard(key)
            elif o == FILL:
                pending.discard(key)
        while j < s.after.shape[0] and s.after[j] <= g:
            if s.after[j] == g and s.slot[j] >= 0:
                pending.add(int(s.key[j]))
            j += 1
    return out
