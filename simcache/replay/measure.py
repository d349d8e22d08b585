"""How long it took: CUDA events around every group and copy, host clocks around every issue.

All events are created before the timed run (creating one while issuing would be host work
the runtime being measured does not do). Per (step, layer) group g:

* ``gpu_s[g]``: compute stream from the group's first operation to its last;
* ``idle_s[g]``: compute stream idle before the group: from the end of group g - 1 to the
  start of group g nothing is queued on it, so this is time the GPU waited for the host;
* ``stall_s[g]``: time the compute stream waited, inside the group, for copies to land;
* ``host_s[g]``: host seconds spent issuing the group (Python and PyTorch calls), including
  any time the host was blocked because the GPU's launch queue was full (once the host runs
  far enough ahead, every group waits for the GPU to retire work: then host time per group
  equals GPU time per group, and GPU idle time, not host time, says who sets the pace);

and per copy its device seconds (``copy_s``), from events around it on the copy stream.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class Timings:
    """What one timed run measured; every array is per group except ``copy_s`` (per copy)."""

    total_s: float
    gpu_s: np.ndarray
    idle_s: np.ndarray
    stall_s: np.ndarray
    host_s: np.ndarray
    copy_s: np.ndarray


class Meter:
    """Events and clocks for ``groups`` groups and ``loads`` copies (on the CPU: clocks only)."""

    def __init__(self, device: torch.device, groups: int, loads: int):
        self.cuda = device.type == "cuda"
        self.device = device

        def events(n):
            return [torch.cuda.Event(enable_timing=True) for _ in range(n)] if self.cuda else []

        self.g_start, self.g_done = events(groups), events(groups)
        self.l_start, self.l_done = events(loads), events(loads)
        self.w_before, self.w_after = events(loads), events(loads)
        self.waits: list[tuple[int, int]] = []  # (group, load) of every wait on a copy
        self.host = np.zeros(groups)
        self._t0 = 0.0
        self._begin = self._end = None

    # -- around the whole run, a group, a copy, a wait ---------------------------------------
    def begin(self):
        if self.cuda:
            torch.cuda.synchronize(self.device)
            self._begin, self._end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self._begin.record()
        self._wall = time.perf_counter()

    def end(self) -> None:
        if self.cuda:
            self._end.record()
            torch.cuda.synchronize(self.device)
        self._wall = time.perf_counter() - self._wall

    def group_start(self, g: int) -> None:
        self._t0 = time.perf_counter()
        if self.cuda:
            self.g_start[g].record()

    def group_done(self, g: int) -> None:
        if self.cuda:
            self.g_done[g].record()
        self.host[g] = time.perf_counter() - self._t0

    def copy_start(self, j: int) -> None:
        if self.cuda:
            self.l_start[j].record()

    def copy_done(self, j: int) -> None:
        if self.cuda:
            self.l_done[j].record()

    def wait_before(self, g: int, j: int) -> None:
        if self.cuda:
            self.w_before[j].record()
            self.waits.append((g, j))

    def wait_after(self, j: int) -> None:
        if self.cuda:
            self.w_after[j].record()

    # -- reading ---------------------------------------------------------------------------
    def read(self) -> Timings:
        """Seconds, after :meth:`end` (which synchronises)."""
        n = len(self.host)
        if not self.cuda:
            return Timings(self._wall, np.zeros(n), np.zeros(n), np.zeros(n), self.host.copy(), np.zeros(0))

        def span(a, b):
            return a.elapsed_time(b) / 1e3

        gpu = np.array([span(a, b) for a, b in zip(self.g_start, self.g_done)])
        idle = np.zeros(n)
        if n:
            idle[0] = span(self._begin, self.g_start[0])
            idle[1:] = [span(self.g_done[g - 1], self.g_start[g]) for g in range(1, n)]
        stall = np.zeros(n)
        for g, j in self.waits:
            stall[g] += span(self.w_before[j], self.w_after[j])
        copies = np.array([span(a, b) for a, b in zip(self.l_start, self.l_done)])
        return Timings(span(self._begin, self._end), gpu, idle, stall, self.host.copy(), copies)
