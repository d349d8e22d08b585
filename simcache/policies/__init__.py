"""Cache policies = eviction x admission.

Each rule is one module holding jitted functions; the registries below are plain dicts, and
presets are named pairs. Adding a policy = one module, one dict entry, one name in the shared
test parametrisation (``tests/test_contract.py``).

An eviction rule supplies ``victim(S, M, pool, stamp)`` (the slot to give up, or -1 when every
resident is pinned) and keeps its own order in ``on_access(S, slot, i, fill)`` and
``on_evict(S, slot)``. An admission rule supplies ``admit(S, M, pool, i, hi, stamp)``; a
learning rule updates scores at the start of each (step, layer) in ``learn(S, M, s, l, lo, hi)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from simcache.errors import SimcacheError
from simcache.policies.admission import always, markov as markov_admission, oracle
from simcache.policies.eviction import belady, fifo, lfu, lifo, lru, markov as markov_eviction
from simcache.policies.eviction import random as random_eviction


@dataclass(frozen=True)
class Eviction:
    name: str
    victim: Callable
    on_access: Callable
    on_evict: Callable
    needs_future: bool = False
    needs_scores: bool = False
    summary: str = ""


@dataclass(frozen=True)
class Admission:
    name: str
    admit: Callable
    learn: Callable | None = None
    needs_future: bool = False
    summary: str = ""


def _eviction(name, module, **kw):
    return Eviction(name, module.victim, module.on_access, module.on_evict, **kw)


EVICTION = {
    "lru": _eviction("lru", lru, summary="least recently demanded"),
    "fifo": _eviction("fifo", fifo, summary="loaded earliest"),
    "lifo": _eviction("lifo", lifo, summary="loaded latest"),
    "lfu": _eviction("lfu", lfu, summary="fewest demands since loaded, ties LRU"),
    "random": _eviction("random", random_eviction, summary="uniform among unpinned (seeded)"),
    "belady": _eviction("belady", belady, needs_future=True, summary="next demand farthest (offline)"),
    "markov": _eviction(
        "markov", markov_eviction, needs_scores=True, summary="lowest P(Return), ties LRU (the fork)"
    ),
}

ADMISSION = {
    "all": Admission("all", always.admit, summary="admit every miss"),
    "markov": Admission(
        "markov", markov_admission.admit, markov_admission.learn,
        summary="admit iff P(Return) >= tau (the fork's rule)",
    ),
    "markov-h": Admission(
        "markov-h", markov_admission.admit, markov_admission.learn_horizon,
        summary="admit iff P(top-1 within h steps) >= tau",
    ),
    "oracle": Admission(
        "oracle", oracle.admit, needs_future=True, summary="admit iff worth keeping (offline)"
    ),
}

PRESETS = {
    "lru": ("lru", "all"),
    "fifo": ("fifo", "all"),
    "lfu": ("lfu", "all"),
    "lifo": ("lifo", "all"),
    "random": ("random", "all"),
    "belady": ("belady", "all"),
    "belady-bypass": ("belady", "oracle"),
    "markov": ("lru", "markov"),
}


def resolve(policy: str | None = "lru", evict: str | None = None, admit: str | None = None):
    """The (Eviction, Admission) pair for a preset, with ``evict`` / ``admit`` overriding its
    halves.

    >>> e, a = resolve("markov", evict="markov")
    >>> e.name, a.name
    ('markov', 'markov')
    """
    base_evict, base_admit = "lru", "all"
    if policy is not None:
        if policy not in PRESETS:
            raise SimcacheError(f"unknown policy '{policy}' (choose from {', '.join(PRESETS)})")
        base_evict, base_admit = PRESETS[policy]
    evict = evict or base_evict
    admit = admit or base_admit
    if evict not in EVICTION:
        raise SimcacheError(f"unknown eviction rule '{evict}' (choose from {', '.join(EVICTION)})")
    if admit not in ADMISSION:
        raise SimcacheError(f"unknown admission rule '{admit}' (choose from {', '.join(ADMISSION)})")
    return EVICTION[evict], ADMISSION[admit]


def policy_name(evict: str, admit: str) -> str:
    """The preset name of a pair, or ``evict+admit``."""
    for name, pair in PRESETS.items():
        if pair == (evict, admit):
            return name
    return f"{evict}+{admit}"
