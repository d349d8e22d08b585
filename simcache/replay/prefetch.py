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
    """

    def __init__(self, schedule: Schedule, slot_of, buffers, source_of, stream=None, timing: bool = True):
        import torch

        if buffers.shape[0] < schedule.buffers:
            raise SimcacheError(f"the prefetch schedule uses {schedule.buffers} buffers, {buffers.shape[0]} given")
        self.schedule, self.slot_of, self.buffers, self.source_of = schedule, slot_of, buffers, source_of
        self.stream = stream
        n = schedule.after.shape[0]
        cuda = stream is not None
        make = (lambda: torch.cuda.Event(enable_timing=timing)) if cuda else (lambda: None)
        self.start = [make() for _ in range(n)]
        self.done = [make() for _ in range(n)]
        self._next = 0
        self._writer: dict[tuple[int, int], int] = {}  # destination -> prefetch that wrote it last
        self.issued = 0

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

    def copy_seconds(self) -> np.ndarray:
        """Seconds of every issued prefetch copy (after a synchronize; CUDA only)."""
        if self.stream is None:
            return np.zeros(0)
        return np.array([a.elapsed_time(b) / 1e3 for a, b in zip(self.start[: self._next], self.done[: self._next])])
