"""Hypothesis strategies for small routing traces."""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st

import simcache


@st.composite
def traces(draw, max_layers=2, max_experts=6, max_k=3, max_requests=4, max_len=10, prompts=True):
    L = draw(st.integers(1, max_layers))
    E = draw(st.integers(2, max_experts))
    k = draw(st.integers(1, min(max_k, E)))
    n_req = draw(st.integers(1, max_requests))
    lengths = draw(st.lists(st.integers(1, max_len), min_size=n_req, max_size=n_req))
    rows_e, req, pos, lay, phase = [], [], [], [], []
    for r, n in enumerate(lengths):
        prompt = draw(st.integers(0, n - 1)) if prompts and n > 1 else 0
        for p in range(n):
            for l in range(L):
                rows_e.append(draw(st.permutations(range(E)))[:k])
                req.append(r)
                pos.append(p)
                lay.append(l)
                phase.append(0 if p < prompt else 1)
    return simcache.Trace.from_arrays(
        np.array(rows_e), request=req, position=pos, layer=lay, phase=phase, num_experts=E,
        expert_bytes=1 << 20,
    )
