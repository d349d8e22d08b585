"""Cache policies = eviction x admission: the registry.

Each rule is one module of jitted hooks ending in a declaration (see
:mod:`simcache.policies.registry`); the lists below are the registry. Adding a policy = its
module and one entry here. The kernel's dispatch, the cache state, the CLI help, the policy
tables of docs/metrics.md and the tests' parametrisation all come from these tables.
"""

from __future__ import annotations

from simcache.errors import SimcacheError
from simcache.policies.admission import always, markov as markov_admission, oracle
from simcache.policies.eviction import (
    arc, belady, fifo, least_stale, lfru, lfu, lfu_decay, lifo, lru, markov, min_visit, mrs, random,
    s3fifo, sieve, twoq,
)
from simcache.policies.registry import Admission, Eviction, declared, learners, table

EVICTION: dict[str, Eviction] = table(declared(
    lru,
    fifo,
    lifo,
    lfu,
    random,
    belady,
    markov,
    sieve,
    s3fifo,
    arc,
    twoq,
    lfru,
    min_visit,
    mrs,
    least_stale,
    lfu_decay,
))

ADMISSION: dict[str, Admission] = table(declared(
    always,
    markov_admission,
    oracle,
))

# Learn functions by code (0 = none); a pair runs its admission's learner, else its eviction's.
LEARNERS = learners(EVICTION, ADMISSION)

PRESETS = {
    "lru": ("lru", "all"),
    "fifo": ("fifo", "all"),
    "lfu": ("lfu", "all"),
    "lifo": ("lifo", "all"),
    "random": ("random", "all"),
    "belady": ("belady", "all"),
    "belady-bypass": ("belady", "oracle"),
    "markov": ("lru", "markov"),
    "sieve": ("sieve", "all"),
    "s3fifo": ("s3fifo", "all"),
    "arc": ("arc", "all"),
    "2q": ("2q", "all"),
    "lfru": ("lfru", "all"),
    "min-visit": ("min-visit", "all"),
    "mrs": ("mrs", "all"),
    "least-stale": ("least-stale", "all"),
    "lfu-decay": ("lfu-decay", "all"),
}


def learner_for(eviction: Eviction, admission: Admission) -> int:
    """The learner code a pair runs: the admission's, else the eviction's, else 0 (none)."""
    fn = admission.learn if admission.learn is not None else eviction.learn
    return next(code for code, f in enumerate(LEARNERS) if f is fn)


def needs_future(eviction: Eviction, admission: Admission) -> bool:
    return eviction.needs_future or admission.needs_future


def resolve(policy: str | None = "lru", evict: str | None = None, admit: str | None = None):
    """The (Eviction, Admission) pair for a preset, with ``evict`` / ``admit`` overriding its
    halves.

    >>> e, a = resolve("markov", evict="markov")
    >>> e.name, a.name
    ('markov', 'markov')
    """
    base_evict, base_admit = "lru", "all"
    if policy is not None:
        if not isinstance(policy, str) or policy not in PRESETS:
            raise SimcacheError(f"unknown policy {policy!r} (choose from {', '.join(PRESETS)})")
        base_evict, base_admit = PRESETS[policy]
    evict = evict or base_evict
    admit = admit or base_admit
    if not isinstance(evict, str) or evict not in EVICTION:
        raise SimcacheError(f"unknown eviction rule {evict!r} (choose from {', '.join(EVICTION)})")
    if not isinstance(admit, str) or admit not in ADMISSION:
        raise SimcacheError(f"unknown admission rule {admit!r} (choose from {', '.join(ADMISSION)})")
    return EVICTION[evict], ADMISSION[admit]


def policy_name(evict: str, admit: str) -> str:
    """The preset name of a pair, or ``evict+admit``."""
    for name, pair in PRESETS.items():
        if pair == (evict, admit):
            return name
    return f"{evict}+{admit}"


def markdown_tables() -> str:
    """The policy tables of docs/metrics.md, generated from the registry."""
    lines = ["| eviction | victim among unpinned residents | source |", "|---|---|---|"]
    lines += [f"| `{p.name}` | {p.summary} | {p.notes} |" for p in EVICTION.values()]
    lines += ["", "| admission | a miss is admitted iff | source |", "|---|---|---|"]
    lines += [f"| `{p.name}` | {p.summary} | {p.notes} |" for p in ADMISSION.values()]
    lines += ["", "| preset | eviction | admission |", "|---|---|---|"]
    lines += [f"| `{name}` | `{e}` | `{a}` |" for name, (e, a) in PRESETS.items()]
    return "\n".join(lines) + "\n"

