"""The copy-engine timeline (docs/design.md §12): time carried across (step, layer) groups.

One GPU runs the groups in execution order; one copy engine moves expert weights host to
device, one copy at a time, ``t_copy`` seconds each. Per group g, starting at S_g (the end of
group g-1):

1. :func:`begin` - the copy started last may still be in flight; the engine state is read
   relative to S_g.
2. :func:`demand` - the group's demand copies (its misses, in expert order) are issued at S_g
   and served before every prefetch that has not started (they overtake the queue; the copy in
   flight completes first).
3. :func:`use` - an expert the group uses whose data arrives after S_g (a prefetch in flight).
4. :func:`request` - prefetch requests made at S_g (after the group's demand is known) join
   the back of the queue.
5. :func:`end` - the group ends at E_g = S_g + duration. With a copy stream (``overlap``),
   duration = max(compute, a + c): every expert's compute hides behind the copies except that
   of the expert arriving last (offset a after S_g, compute c), which starts when it arrives;
   without one, duration = a + compute. With no prefetch this is docs/design.md §5's per-group time
   bit for bit (a = loads x t_copy). stall = duration - compute (the GPU waiting on copies).
6. :func:`next_start` / :func:`start` / :func:`drop` - queued prefetches whose start time
   (the engine free and the request made) falls before E_g start now, in request order; the
   caller decides, at its start, where each goes or whether it is dropped (it takes no engine
   time then).

The state is plain arrays (:func:`new_timeline`), so the simulation kernel and the tests share
it; every function is a no-NRT kernel inlined into its caller. The slow twin is
``tests/naive.py``'s ``Timeline``; docs/prefetch.md states the rules in full.
"""

from __future__ import annotations

from collections import namedtuple

import numpy as np

from simcache._jit import kernel as jit

Timeline = namedtuple(
    "Timeline",
    [
        "clock",  # (4,) float64: [S of the running group, engine free at, t_copy, 0]
        "group",  # (4,) float64: this group's [offset of the engine's backlog at S,
        #           demand copies so far, offset of the last arrival, its compute]
        "arrival",  # (keys,) float64: when the key's latest copy completes
        "q_key",  # (ring,) int32: queued prefetch requests (ring buffer)
        "q_target",  # (ring,) int64: the group each request is for
        "q_origin",  # (ring,) int64: the group that made it
        "q_time",  # (ring,) float64: when it was made
        "q_pos",  # (2,) int64: [head, count]
    ],
)


def new_timeline(num_keys: int, t_copy: float, ring: int) -> Timeline:
    """An idle engine at time 0 with room for ``ring`` queued prefetch requests."""
    ring = max(int(ring), 1)
    return Timeline(
        clock=np.array([0.0, 0.0, float(t_copy), 0.0]),
        group=np.zeros(4),
        arrival=np.zeros(num_keys),
        q_key=np.zeros(ring, np.int32),
        q_target=np.zeros(ring, np.int64),
        q_origin=np.zeros(ring, np.int64),
        q_time=np.zeros(ring),
        q_pos=np.zeros(2, np.int64),
    )


@jit
def begin(T):
    """Start a group at the clock: the engine's backlog (the copy in flight) as an offset."""
    backlog = T.clock[1] - T.clock[0]
    T.group[0] = backlog if backlog > 0.0 else 0.0
    T.group[1] = 0.0
    T.group[2] = 0.0
    T.group[3] = 0.0


@jit
def waits(T, key):
    """Whether ``key``'s data arrives after the running group's start."""
    return T.arrival[key] > T.clock[0]


@jit
def demand(T, key, cost):
    """A demand copy of ``key``, issued at the group's start ahead of queued prefetches;
    ``cost`` is its compute in this group."""
    T.group[1] += 1.0
    off = T.group[0] + T.group[1] * T.clock[2]
    T.arrival[key] = T.clock[0] + off
    T.clock[1] = T.clock[0] + off
    T.group[2] = off
    T.group[3] = cost


@jit
def use(T, key, cost):
    """The group uses ``key``, whose copy completes after the group's start (a prefetch in
    flight, or one started before it and not yet done)."""
    off = T.arrival[key] - T.clock[0]
    if off >= T.group[2]:
        T.group[2] = off
        T.group[3] = cost


@jit
def request(T, key, target, origin):
    """Queue a prefetch of ``key`` for group ``target``, made now by group ``origin``. A full
    ring forgets its oldest request (sized so that it does not happen; see the wrapper)."""
    n = T.q_key.shape[0]
    if T.q_pos[1] == n:
        T.q_pos[0] = (T.q_pos[0] + 1) % n
        T.q_pos[1] -= 1
    j = (T.q_pos[0] + T.q_pos[1]) % n
    T.q_key[j] = key
    T.q_target[j] = target
    T.q_origin[j] = origin
    T.q_time[j] = T.clock[0]
    T.q_pos[1] += 1


@jit
def end(T, compute, overlap):
    """End the running group; returns its duration (the clock moves to its end)."""
    if overlap:
        t = T.group[2] + T.group[3]
        if compute > t:
            t = compute
    else:
        t = T.group[2] + compute
    T.clock[0] += t
    return t


@jit
def next_start(T):
    """The ring index of the queued request that starts before the clock, or -1."""
    if T.q_pos[1] == 0:
        return -1
    j = T.q_pos[0]
    at = T.q_time[j]
    if T.clock[1] > at:
        at = T.clock[1]
    return j if at < T.clock[0] else -1


@jit
def start(T, j):
    """Start request ``j`` (the head, from :func:`next_start`): one copy on the engine."""
    at = T.q_time[j]
    if T.clock[1] > at:
        at = T.clock[1]
    done = at + T.clock[2]
    T.arrival[T.q_key[j]] = done
    T.clock[1] = done
    drop(T, j)


@jit
def drop(T, j):
    """Take the head request off the queue without copying anything."""
    T.q_pos[0] = (j + 1) % T.q_key.shape[0]
    T.q_pos[1] -= 1
