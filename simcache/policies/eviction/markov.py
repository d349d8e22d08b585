"""Markov eviction: evict the resident with the lowest P(Return), ties to the least recently
used — the rule of the mixtral-offloading fork that the write-up describes. Scores come from
the Markov learner (:mod:`simcache.policies.admission.markov`)."""

from simcache._jit import kernel as jit
from simcache.policies._order import RECENCY_STATE, noop_evict, note_access
from simcache.policies.admission.markov import SCORE_STATE, learn, p_return
from simcache.policies.registry import Eviction


@jit
def victim(S, M, pool, i, stamp):
    best = -1
    for slot in range(S.base[pool], S.base[pool] + S.used[pool]):
        if S.pin[slot] == stamp:
            continue
        if best < 0:
            best = slot
            continue
        a = p_return(S, M, S.slot_key[slot])
        c = p_return(S, M, S.slot_key[best])
        if a < c:
            best = slot
        elif a == c:
            if S.last[slot] < S.last[best]:
                best = slot
    return best


POLICY = Eviction(
    "markov", victim=victim, on_access=note_access, on_evict=noop_evict,
    state={**RECENCY_STATE, **SCORE_STATE}, learn=learn, knobs=("prior", "decay", "decay_every"),
    summary="lowest P(Return); ties → least recently used (the fork's eviction)",
    notes="Yuelinfeng/mixtral-offloading (src/markov_expert_cache.py)",
)
