"""The arrays a cache simulation runs on, shared by the loop and every policy.

The loop in :mod:`simcache.simulator` owns the bookkeeping (hits, fills, bypasses, evictions,
pins, next use) in the *core* fields below; each policy declares the fields it keeps its own
order in (a linked list, a heap, last access and frequency, scores) beside its hooks, and
:data:`CacheState` is the union, built once from the registry. Everything is a plain numpy
array so the numba kernels can share it without objects; the fields of policies that are not
running are empty arrays of the same type, so one pair's state costs only what it uses.

Slots of pool p are ``base[p] .. base[p] + cap[p] - 1``; per-layer scope has one pool per
layer, global scope one pool. A slot is *pinned* while ``pin[slot]`` equals the stamp of the
(step, layer) group being served: such an expert is demanded now and cannot be evicted.
"""

from __future__ import annotations

from collections import namedtuple

import numpy as np

from simcache.policies import ADMISSION, EVICTION
from simcache.policies.registry import Field, Sizes, state_fields


def _base(z):
    base = np.zeros(z.pools, np.int64)
    base[1:] = np.cumsum(z.cap)[:-1]
    return base


CORE = {
    "keys": Field(lambda z: z.accesses, np.int32, doc="the access stream (layer x E + expert): the "
                  "workload's own array, int16 or int32 (workload.demand)",
                  init=lambda z: z.inputs["keys"]),
    "future": Field(lambda z: z.accesses, np.int64, doc="rank of each access's next use "
                    "(workload.future_order); empty unless a rule needs the future",
                    init=lambda z: z.inputs["future"]),
    "where": Field(lambda z: z.keys, np.int32, fill=-1, doc="slot holding the key, -1 if absent"),
    "evicted": Field(lambda z: z.keys, np.bool_, doc="the key was evicted at least once (reloads)"),
    "slot_key": Field(lambda z: z.slots, np.int32, fill=-1, doc="key in the slot"),
    "slot_pool": Field(lambda z: z.slots, np.int32, doc="pool of the slot",
                       init=lambda z: np.repeat(np.arange(z.pools), z.cap)),
    "base": Field(lambda z: z.pools, np.int64, doc="first slot of each pool", init=_base),
    "cap": Field(lambda z: z.pools, np.int64, doc="slots of each pool", init=lambda z: z.cap),
    "used": Field(lambda z: z.pools, np.int64, doc="slots filled so far (never decreases)"),
    "pin": Field(lambda z: z.slots + 1, np.int64, doc="stamp of the group that last demanded the "
                 "slot; the spare last entry absorbs pins of absent keys (slot -1)"),
    "nu": Field(lambda z: z.slots, np.int64, doc="the resident's future rank"),
}

FIELDS = state_fields(CORE, EVICTION, ADMISSION)
CacheState = namedtuple("CacheState", list(FIELDS), module=__name__)
CacheState.__doc__ = "Cache state arrays; see :data:`FIELDS` for each one's meaning."


def new_state(*, keys, future, num_layers, num_experts, pool_caps, rules=(), seed=0,
              workload=None) -> CacheState:
    """A cold cache: every slot free, every key absent. ``rules`` are the running policies
    (their fields are allocated; the others' are empty); ``workload`` is what their fields'
    ``init`` may read (:mod:`simcache.policies._steps`)."""
    cap = np.asarray(pool_caps, np.int64)
    sizes = Sizes(
        keys=num_layers * num_experts, slots=int(cap.sum()), pools=len(cap), layers=num_layers,
        experts=num_experts, accesses=len(keys), cap=cap, seed=seed,
        inputs={"keys": keys, "future": future, "workload": workload},
    )
    wanted = set(CORE)
    for rule in rules:
        wanted.update(rule.state)
    arrays = {}
    for name, f in FIELDS.items():
        if name in ("keys", "future"):  # the workload's own arrays, not copies
            arrays[name] = keys if name == "keys" else future
        else:
            arrays[name] = f.build(sizes) if name in wanted else f.empty(sizes)
    return CacheState(**arrays)


Learner = namedtuple(
    "Learner",
    [
        # the Markov learner's inputs (simcache.policies.admission.markov)
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
        "work",  # (4 E,) float64 scratch
    ],
)
