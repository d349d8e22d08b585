"""The arrays a cache simulation runs on, shared by the loop and every policy.

The loop in :mod:`simcache.simulator` owns the bookkeeping (hits, fills, bypasses, evictions,
pins, next use); a policy reads these arrays and keeps its own order in the fields reserved for
it (a linked list, a heap, last access and frequency, scores). Everything is a plain numpy array so the
numba kernels can share it without objects.

Slots of pool p are ``base[p] .. base[p] + cap[p] - 1``; per-layer scope has one pool per
layer, global scope one pool. A slot is *pinned* while ``pin[slot]`` equals the stamp of the
(step, layer) group being served: such an expert is demanded now and cannot be evicted.
"""

from __future__ import annotations

from collections import namedtuple

import numpy as np

CacheState = namedtuple(
    "CacheState",
    [
        "keys",  # (accesses,) int32: the access stream
        "future",  # (accesses,) int64 rank of the next use (workload.future_order), or (0,)
        "where",  # (keys,) int32: slot holding the key, -1 if not resident
        "evicted",  # (keys,) bool: the key was evicted at least once (reload counting)
        "slot_key",  # (slots,) int32
        "slot_pool",  # (slots,) int32
        "base",  # (pools,) int64
        "cap",  # (pools,) int64
        "used",  # (pools,) int64: slots filled so far (never decreases)
        "pin",  # (slots + 1,) int64: stamp of the group that last demanded the slot; the
        #        spare last entry absorbs pins of absent keys (slot -1)
        "nu",  # (slots,) int64: the resident's future rank (see workload.future_order)
        # policy-owned order structures
        "last",  # (slots,) int64: access index of the last hit or fill (LFU, Markov ties)
        "freq",  # (slots,) int64: accesses since the fill (LFU)
        "prev",  # (slots + pools,) int32  circular doubly linked list per pool; the
        "next",  # (slots + pools,) int32  sentinel of pool p is node slots + p
        "prio",  # (slots,) int64  heap priority (largest is evicted first)
        "heap",  # (slots,) int32  per-pool binary heaps laid out like the slots
        "hpos",  # (slots,) int32
        "hsize",  # (pools,) int64
        "scratch",  # (slots + 1,) int64  work space (heap search stack)
        "score",  # (keys,) float64  Markov learner's score s[e] of each key (unnormalised)
        "total",  # (layers,) float64  sum of s over the layer: P(Return) = score / total
        "nodata",  # (layers,) bool  the learner had no data at the layer's last group
        "rng",  # (1,) uint64  splitmix64 state for random eviction
    ],
)

Learner = namedtuple(
    "Learner",
    [
        "T",  # (layers, E, E) float64 transition counts (online, causal)
        "top1",  # (tokens, layers) int16 top-1 expert of every token
        "pair_ptr",  # (steps + 1,) int64
        "pair_prev",  # (pairs,) int64 previous token of the same request
        "pair_cur",  # (pairs,) int64
        "E",  # int
        "decay_every",  # int: multiply T by `decay` every this many steps
        "decay",  # float
        "horizon",  # int: steps ahead for the horizon variant
        "tau",  # float: admission threshold
        "work",  # (E * (horizon + 2),) float64 scratch
    ],
)


def new_state(keys, future, num_keys, num_layers, pool_caps, seed=0):
    """A cold cache: every slot free, every key absent."""
    pools = len(pool_caps)
    cap = np.asarray(pool_caps, np.int64)
    base = np.zeros(pools, np.int64)
    base[1:] = np.cumsum(cap)[:-1]
    slots = int(cap.sum())
    slot_pool = np.repeat(np.arange(pools, dtype=np.int32), cap)
    return CacheState(
        keys=keys,
        future=future,
        where=np.full(num_keys, -1, np.int32),
        evicted=np.zeros(num_keys, np.bool_),
        slot_key=np.full(slots, -1, np.int32),
        slot_pool=slot_pool,
        base=base,
        cap=cap,
        used=np.zeros(pools, np.int64),
        pin=np.zeros(slots + 1, np.int64),
        last=np.zeros(slots, np.int64),
        freq=np.zeros(slots, np.int64),
        nu=np.zeros(slots, np.int64),
        prev=np.arange(slots + pools, dtype=np.int32),  # every list starts empty: the
        next=np.arange(slots + pools, dtype=np.int32),  # sentinel points at itself
        prio=np.zeros(slots, np.int64),
        heap=np.zeros(slots, np.int32),
        hpos=np.zeros(slots, np.int32),
        hsize=np.zeros(pools, np.int64),
        scratch=np.zeros(slots + 1, np.int64),
        score=np.zeros(num_keys, np.float64),
        total=np.zeros(num_layers, np.float64),
        nodata=np.ones(num_layers, np.bool_),
        rng=np.array([np.uint64(seed) ^ np.uint64(0x9E3779B97F4A7C15)], np.uint64),
    )
