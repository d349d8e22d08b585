"""What a policy is: the declaration a policy module ends with, and the tables built from them.

A policy module holds a few jitted functions and ends with one declaration::

    POLICY = Eviction("lru", victim=victim, on_access=on_access, on_evict=on_evict,
                      state=LIST_STATE, summary="least recently demanded", notes="...")

:mod:`simcache.policies` lists the modules (one entry each); everything else — the kernel's
dispatch (:mod:`simcache.policies._dispatch`), the cache state's fields
(:mod:`simcache.state`), the CLI's help, the policy tables of docs/metrics.md, the contract
suite and the goldens — is generated from these declarations.

Hooks, all jitted with :func:`simcache._jit.kernel` (inlined into the loop):

``victim(S, M, pool, i, stamp) -> slot``
    The slot to give up for the miss at access ``i``, among ``pool``'s residents not pinned
    by ``stamp`` (the current group), or -1 if all are pinned. May reorder the policy's own
    structures (S3-FIFO moves residents between queues here).
``on_access(S, M, slot, i, fill)``
    ``slot`` was hit (``fill=False``) or filled (``fill=True``) by access ``i``.
``on_evict(S, M, slot, i)``
    ``slot``'s key leaves the cache, making room for access ``i``.
``admit(S, M, pool, i, hi, stamp) -> bool``
    Whether the miss at access ``i`` (its group ends at ``hi``) may take a slot.
``learn(S, M, s, l, lo, hi)``
    Called at the start of each (step ``s``, layer ``l``) group (accesses ``lo:hi``) to
    update scores; at most one learner runs per simulation (the admission's, else the
    eviction's).

``S`` is the :class:`~simcache.state.CacheState`, ``M`` the Markov learner's inputs
(:class:`~simcache.state.Learner`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Callable, Mapping

import numpy as np

from simcache.errors import SimcacheError


@dataclass(frozen=True)
class Field:
    """One array of the cache state.

    ``shape`` maps the simulation's sizes (:class:`Sizes`) to the array's shape (an int or a
    tuple); ``fill`` is its initial value, or ``init`` builds it (of that shape). Policies that are not running get an empty array
    of the same dtype and rank, so the kernel's types do not depend on the pair.
    """

    shape: Callable[["Sizes"], Any]
    dtype: Any
    fill: Any = 0
    doc: str = ""
    init: Callable[["Sizes"], np.ndarray] | None = None

    def build(self, sizes: "Sizes") -> np.ndarray:
        if self.init is not None:
            return np.ascontiguousarray(self.init(sizes), dtype=self.dtype)
        return np.full(self.shape(sizes), self.fill, dtype=self.dtype)

    def empty(self, sizes: "Sizes") -> np.ndarray:
        shape = self.shape(sizes)
        return np.zeros((0,) * (len(shape) if isinstance(shape, tuple) else 1), dtype=self.dtype)


@dataclass(frozen=True)
class Sizes:
    """What a state field's shape may depend on."""

    keys: int  # layers x experts
    slots: int
    pools: int
    layers: int
    experts: int
    accesses: int
    cap: np.ndarray  # (pools,) slots per pool
    seed: int = 0
    inputs: Mapping[str, Any] = field(default_factory=dict)  # workload-derived arrays


@dataclass(frozen=True)
class Eviction:
    """An eviction rule. See the module docstring for the hooks."""

    name: str
    victim: Callable
    on_access: Callable
    on_evict: Callable
    summary: str
    notes: str = ""  # the paper or system the rule comes from
    state: Mapping[str, Field] = field(default_factory=dict)
    learn: Callable | None = None  # scores it ranks by (Markov eviction)
    needs_future: bool = False
    knobs: tuple[str, ...] = ()  # simulate() options it reads (reported with its results)
    code: int = -1  # position in the registry, set by :func:`table`


@dataclass(frozen=True)
class Admission:
    """An admission rule. See the module docstring for the hooks."""

    name: str
    admit: Callable
    summary: str
    notes: str = ""
    state: Mapping[str, Field] = field(default_factory=dict)
    learn: Callable | None = None
    needs_future: bool = False
    knobs: tuple[str, ...] = ()
    code: int = -1


def table(policies) -> dict:
    """name -> policy, codes assigned in order; a module may declare several (``POLICIES``)."""
    out = {}
    for p in policies:
        if p.name in out:
            raise SimcacheError(f"policy '{p.name}' is registered twice")
        out[p.name] = replace(p, code=len(out))
    return out


def declared(*modules):
    """The policies the modules declare (``POLICY`` or ``POLICIES``), in order."""
    for m in modules:
        yield from getattr(m, "POLICIES", None) or (m.POLICY,)


def learners(eviction: Mapping, admission: Mapping) -> tuple:
    """Distinct learn functions, code 0 meaning none."""
    out = [None]
    for p in (*eviction.values(), *admission.values()):
        if p.learn is not None and all(p.learn is not q for q in out):
            out.append(p.learn)
    return tuple(out)


def state_fields(core: Mapping[str, Field], *tables: Mapping) -> dict:
    """The core fields, then every policy's, each name declared once (or identically)."""
    fields = dict(core)
    for tab in tables:
        for p in tab.values():
            for name, f in p.state.items():
                if name in fields and fields[name] is not f:
                    raise SimcacheError(f"state field '{name}' of policy '{p.name}' is declared twice")
                fields[name] = f
    return fields
