"""The decision log: what the simulator decided for every access, for replay on a GPU.

One Parquet row per access, in simulation order: the (step, layer) group, the expert, the
tokens routed to it, the outcome (hit / fill / bypass / forced bypass), the slot inside the
layer's (or global) pool for hits and fills, and the evicted (layer, expert) for fills that
evicted. File metadata names the trace (with a fingerprint of its routing), the workload and
the policy, and carries the simulator's predicted times, so a replay can refuse a log that
does not belong to its trace and print the prediction beside what it measures.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from simcache._files import atomic_output
from simcache.errors import SimcacheError
from simcache.trace import Trace

LOG_VERSION = 1
KEY = b"simcache_decisions"


def fingerprint(trace: Trace) -> str:
    """A short hash of the routing (requests, positions, phases, experts)."""
    h = hashlib.sha1()
    for a in (trace.request, trace.position, trace.phase, trace.experts):
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:16]


@dataclass(frozen=True, eq=False)
class DecisionLog:
    group_ptr: np.ndarray  # (groups + 1,) int64
    keys: np.ndarray  # (accesses,) int32: layer * E + expert
    tokens: np.ndarray  # (accesses,) int32
    outcome: np.ndarray  # (accesses,) int8: 0 hit, 1 fill, 2 bypass, 3 forced bypass,
    #                      4 served from a prefetch buffer (docs/prefetch.md)
    slot: np.ndarray  # (accesses,) int32: slot inside the pool (the buffer for 4), or -1
    victim: np.ndarray  # (accesses,) int32: evicted key, or -1
    meta: dict

    @property
    def num_layers(self) -> int:
        return int(self.meta["num_layers"])

    @property
    def num_experts(self) -> int:
        return int(self.meta["num_experts"])

    def check_trace(self, trace: Trace) -> None:
        """Raise unless this log was made from ``trace``."""
        if fingerprint(trace) != self.meta.get("trace_fingerprint"):
            raise SimcacheError(
                "the decision log does not match the trace (different routing fingerprint)"
            )


def write_decisions(work, result, path) -> Path:
    """Write the decisions of ``result`` (simulated with ``record=True`` on ``work``)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if result.decisions is None:
        raise SimcacheError("the result holds no decisions (simulate with record=True)")
    d = work.demand
    L, E = d.num_layers, d.num_experts
    group_of = np.repeat(np.arange(d.group_ptr.shape[0] - 1, dtype=np.int64), np.diff(d.group_ptr))
    dec = result.decisions
    meta = {
        "log_version": LOG_VERSION,
        "trace_fingerprint": fingerprint(work.trace),
        "model": work.trace.model,
        "num_layers": L,
        "num_experts": E,
        "top_k": work.trace.top_k,
        "expert_bytes": result.expert_bytes,
        "batch": work.batch,
        "prefill": work.prefill,
        "policy": result.policy,
        "evict": result.evict,
        "admit": result.admit,
        "capacity": result.capacity,
        "scope": result.scope,
        "threshold": result.threshold,
        "steps": result.steps,
        "decode_tokens": result.decode_tokens,
        "predicted": result.to_dict(per_layer=True),
    }
    if dec.prefetch_schedule is not None:  # docs/prefetch.md; read by simcache.replay.prefetch
        sched = dec.prefetch_schedule
        meta["prefetch"] = {
            "predictor": result.prefetch, "width": result.prefetch_width,
            "after": sched[:, 0].tolist(), "key": sched[:, 1].tolist(),
            "slot": sched[:, 2].tolist(), "buffer": sched[:, 3].tolist(),
        }
    table = pa.table(
        {
            "step": pa.array((group_of // L).astype(np.int32)),
            "layer": pa.array((group_of % L).astype(np.int16)),
            "expert": pa.array((d.keys % E).astype(np.int16)),
            "tokens": pa.array(d.tokens),
            "outcome": pa.array(dec.outcome),
            "slot": pa.array(dec.slot),
            "victim_layer": pa.array(np.where(dec.victim >= 0, dec.victim // E, -1).astype(np.int16)),
            "victim_expert": pa.array(np.where(dec.victim >= 0, dec.victim % E, -1).astype(np.int16)),
        }
    )
    table = table.replace_schema_metadata({KEY: json.dumps(meta).encode()})
    with atomic_output(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")
    return Path(path)


def read_decisions(path) -> DecisionLog:
    """Read and check a decision log written by ``simcache simulate --decisions``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    if not path.exists():
        raise SimcacheError(f"decision log not found: {path}")
    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise SimcacheError(f"{path} is not a Parquet file ({str(exc).splitlines()[0]})") from None
    raw = (table.schema.metadata or {}).get(KEY)
    if raw is None:
        raise SimcacheError(f"{path} is not a simcache decision log")
    meta = json.loads(raw)
    if meta.get("log_version") != LOG_VERSION:
        raise SimcacheError(f"{path}: decision log version {meta.get('log_version')!r} not supported")
    L, E = int(meta["num_layers"]), int(meta["num_experts"])
    col = {name: table.column(name).to_numpy() for name in table.column_names}
    groups = col["step"].astype(np.int64) * L + col["layer"]
    n_groups = int(meta["steps"]) * L
    if groups.size and (np.any(np.diff(groups) < 0) or groups[-1] >= n_groups):
        raise SimcacheError(f"{path}: rows are not in simulation order")
    group_ptr = np.zeros(n_groups + 1, np.int64)
    np.cumsum(np.bincount(groups, minlength=n_groups), out=group_ptr[1:])
    keys = (col["layer"].astype(np.int32) * E + col["expert"]).astype(np.int32)
    victim = np.where(col["victim_layer"] >= 0, col["victim_layer"].astype(np.int32) * E + col["victim_expert"], -1)
    return DecisionLog(
        group_ptr=group_ptr,
        keys=keys,
        tokens=col["tokens"].astype(np.int32),
        outcome=col["outcome"].astype(np.int8),
        slot=col["slot"].astype(np.int32),
        victim=victim.astype(np.int32),
        meta=meta,
    )
