"""Shared fixtures: the bundled trace, the raw data beside the checkout, small random traces."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

import simcache

ROOT = Path(__file__).resolve().parents[1]
TRACES = ROOT / "traces"
SHARED = Path(os.environ.get("SIMCACHE_SHARED", ROOT.parent / "shared"))
RAW = SHARED / "traces" / "raw"
FLAME_RAW = RAW / "flame-moe-290m" / "flame_moe_290m_iter5473_routing.parquet"
SEED_MATRICES = RAW / "seed-transition-matrices"


@pytest.fixture(scope="session")
def flame():
    return simcache.read_trace(TRACES / "flame-moe-290m.parquet")


def random_trace(seed, *, layers=2, experts=6, top_k=2, requests=4, length=(3, 12),
                 prompt=0, stickiness=0.6):
    """A small trace with some locality, random lengths and optional prompts."""
    rng = np.random.default_rng(seed)
    t = simcache.synth(
        requests, tuple(length), num_layers=layers, num_experts=experts, top_k=top_k,
        communities=max(1, experts // 3), stickiness=stickiness, prompt_length=prompt,
        seed=int(rng.integers(1 << 30)), expert_bytes=1 << 20,
    )
    return t


def rule_inputs(evict, trace):
    """What a rule needs beyond the trace: training demand for rules that place residents up
    front (counted on the trace itself here: these tests check mechanics, not scores)."""
    if evict is None or simcache.EVICTION[evict].place is None:
        return {}
    return {"train_demand": simcache.demand_counts(trace)}


def require(path: Path):
    if not path.exists():
        pytest.skip(f"{path} not present (../shared beside the checkout)")
    return path
