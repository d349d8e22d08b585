"""Least-Stale: evict the resident whose layer comes round again last. Layers run in order,
so at layer l an expert of layer m is next wanted (m − l − 1) mod L + 1 layers from now;
the expert of the layer just run (or an unpinned one of layer l itself) is the stalest.
Ties (the same layer; always, in per-layer pools) go to the least recently used.

Notes
-----
Hoang et al., "SpecMD: a comprehensive study on speculative expert prefetching" (arXiv
2602.03921), Least-Stale eviction. Only the paper's abstract could be read here; this is
its stated idea (MoE's predictable layer-by-layer access, combining that spatial order with
recency), not a transcription of its code. With ``--scope layer`` it reduces to LRU.
"""

from simcache._jit import kernel as jit
from simcache.policies._order import RECENCY_STATE, noop_evict, note_access
from simcache.policies._steps import LAYERS_STATE
from simcache.policies.registry import Eviction


@jit
def victim(S, M, pool, i, stamp):
    L = S.n_layers[0]
    here = S.keys[i] // M.E
    best = -1
    far = -1
    for slot in range(S.base[pool], S.base[pool] + S.used[pool]):
        if S.pin[slot] == stamp:
            continue
        d = (S.slot_key[slot] // M.E - here - 1) % L + 1
        if d > far or (d == far and S.last[slot] < S.last[best]):
            best = slot
            far = d
    return best


POLICY = Eviction(
    "least-stale", victim=victim, on_access=note_access, on_evict=noop_evict,
    state={**RECENCY_STATE, **LAYERS_STATE},
    summary="its layer comes round again last; ties → least recently used (LRU per layer)",
    notes="Hoang et al., SpecMD (arXiv 2602.03921), from its abstract",
)
