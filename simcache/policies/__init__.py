"""Cache policies = eviction x admission.

Each rule is one module holding jitted functions; the registries below are plain dicts, and
presets are named pairs. Adding a policy = one module, one dict entry, one line in each chain of
``_dispatch.py`` (the loop reaches policies through it; see ``simcache._jit`` for why), and the
shared test parametrisation picks it up from the dict.

An eviction rule supplies ``victim(S, M, pool, stamp)`` (the slot to give up, or -1 when every
resident is pinned) and keeps its own order in ``on_access(S, slot, i, fill)`` and
``on_evict(S, slot)``. An admission rule supplies ``admit(S, M, pool, i, hi, stamp)``; a
learning rule updates scores at the start of each (step, layer) in ``learn(S, M, s, l, lo, hi)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

from simcache.errors import SimcacheError
from simcache.policies import _dispatch
from simcache.policies.admission import always, markov as markov_admission, oracle
from simcache.policies.eviction import belady, fifo, lfu, lifo, lru, markov as markov_eviction
from simcache.policies.eviction import random as random_eviction


@dataclass(frozen=True)
class Eviction:
    """An eviction rule: ``module`` holds ``victim``, ``on_access``, ``on_evict``."""

    name: str
    code: int
    module: ModuleType
    needs_future: bool = False
    needs_scores: bool = False
    summary: str = ""


@dataclass(frozen=True)
class Admission:
    """An admission rule: ``module`` holds ``admit``; ``learner`` updates its scores."""

    name: str
    code: int
    module: ModuleType
    learner: int = _dispatch.NO_LEARNER
    needs_future: bool = False
    summary: str = ""


EVICTION = {
    "lru": Eviction("lru", _dispatch.LRU, lru, summary="least recently demanded"),
    "fifo": Eviction("fifo", _dispatch.FIFO, fifo, summary="loaded earliest"),
    "lifo": Eviction("lifo", _dispatch.LIFO, lifo, summary="loaded latest"),
    "lfu": Eviction("lfu", _dispatch.LFU, lfu, summary="fewest demands since loaded, ties LRU"),
    "random": Eviction("random", _dispatch.RANDOM, random_eviction,
                       summary="uniform among unpinned (seeded)"),
    "belady": Eviction("belady", _dispatch.BELADY, belady, needs_future=True,
                       summary="next demand farthest (offline)"),
    "markov": Eviction("markov", _dispatch.MARKOV, markov_eviction, needs_scores=True,
                       summary="lowest P(Return), ties LRU (the fork)"),
}

ADMISSION = {
    "all": Admission("all", _dispatch.ALL, always, summary="admit every miss"),
    "markov": Admission("markov", _dispatch.MARKOV_ADMIT, markov_admission,
                        learner=_dispatch.FORK_LEARNER,
                        summary="admit iff P(Return) >= tau (the fork's rule)"),
    "markov-h": Admission("markov-h", _dispatch.MARKOV_ADMIT, markov_admission,
                          learner=_dispatch.HORIZON_LEARNER,
                          summary="admit iff P(top-1 within h steps) >= tau"),
    "oracle": Admission("oracle", _dispatch.ORACLE, oracle, needs_future=True,
                        summary="admit iff worth keeping (offline)"),
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


def learner_for(eviction: Eviction, admission: Admission) -> int:
    """The learner a pair needs: the admission's, else the fork's for Markov eviction."""
    if admission.learner != _dispatch.NO_LEARNER:
        return admission.learner
    return _dispatch.FORK_LEARNER if eviction.needs_scores else _dispatch.NO_LEARNER


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
