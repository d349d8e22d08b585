"""Cross-check against libCacheSim: top-1, batch 1, one cache per layer — a flat sequence per
layer, where both simulators' semantics coincide exactly."""

from __future__ import annotations

import numpy as np
import pytest

import simcache

from . import naive
from .conftest import SEED_MATRICES

lcs = pytest.importorskip("libcachesim")

# simcache rule -> (libCacheSim class, smallest pool libCacheSim runs it on: its 2Q admits
# nothing under 4 slots, its S3-FIFO needs a small queue of 2, i.e. 20 slots)
PEERS = {"lru": ("LRU", 1), "fifo": ("FIFO", 1), "belady": ("Belady", 1), "sieve": ("Sieve", 1),
         "arc": ("ARC", 1), "2q": ("TwoQ", 4), "s3fifo": ("S3FIFO", 20)}


def write_oracle_general(keys, path):
    n = keys.shape[0]
    nxt = simcache.workload.next_use(keys.astype(np.int32), int(keys.max()) + 1)
    rec = np.zeros(n, dtype=[("t", "<u4"), ("id", "<u8"), ("size", "<u4"), ("next", "<i8")])
    rec["t"] = np.arange(n)
    rec["id"] = keys.astype(np.uint64) + 1
    rec["size"] = 1
    rec["next"] = np.where(nxt < n, nxt, -1)
    rec.tofile(path)


def lcs_hits(cls, path, capacity, n):
    reader = lcs.TraceReader(str(path), lcs.TraceType.ORACLE_GENERAL_TRACE)
    miss_ratio, _ = cls(cache_size=capacity).process_trace(reader)
    return int(round((1 - miss_ratio) * n))


def top1_trace(seed):
    counts = np.load(SEED_MATRICES / "mixtral_top1_transition_counts.npy") if SEED_MATRICES.exists() else None
    kw = {} if counts is not None else dict(num_layers=4, num_experts=8)
    return simcache.synth(12, (50, 120), top_k=1, transitions=counts, seed=seed, **kw)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("policy", ["lru", "fifo", "belady"])  # the rest: the flat pool below
def test_per_layer_hits_equal_libcachesim(tmp_path, seed, policy):
    cls, least = PEERS[policy]
    t = top1_trace(seed)
    work = simcache.Workload(t)
    keys = work.demand.keys.astype(np.int64)
    E = t.num_experts
    for capacity in (c for c in (1, 2, 3, 5) if c >= least):
        r = simcache.simulate(work, policy, capacity)
        for l in range(t.num_layers):
            seq = keys[keys // E == l]
            path = tmp_path / f"l{l}.bin"
            write_oracle_general(seq, path)
            assert r.per_layer["hits"][l] == lcs_hits(getattr(lcs, cls), path, capacity, seq.size), (l, capacity)


def test_flat_global_pool_equals_libcachesim(tmp_path):
    """One global pool over all layers' keys: the whole access stream is one flat sequence."""
    t = top1_trace(3)
    work = simcache.Workload(t)
    keys = work.demand.keys.astype(np.int64)
    path = tmp_path / "flat.bin"
    write_oracle_general(keys, path)
    for capacity in (8, 20, 32, min(100, t.num_layers * t.num_experts)):
        for policy, (cls, least) in PEERS.items():
            if capacity < least:
                continue
            r = simcache.simulate(work, policy, capacity, scope="global")
            assert r.hits == lcs_hits(getattr(lcs, cls), path, capacity, keys.size), (policy, capacity)
        assert simcache.simulate(work, "lru", capacity, scope="global").hits == naive.lru_hits_flat(keys.tolist(), capacity)
