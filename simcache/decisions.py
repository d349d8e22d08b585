"""The decision log: what the simulator decided for every access, for replay on a GPU.

One Parquet row per access, in simulation order: the (step, layer) group, the expert, the
tokens routed to it, the outcome (hit / fill / bypass / forced bypass / computed on the host
CPU under ``--miss cpu|auto``), the slot inside the
layer's (or global) pool for hits and fills, and the evicted (layer, expert) for fills that
evicted. File metadata holds the run's :class:`Settings` (every simulate() argument that
changes a decision, the content hashes of the scored trace and of the prior) and the
simulator's predicted times, so ``simcache replay --decisions`` reproduces the run from the
log alone and refuses a trace the log was not made from (docs/design.md §6).
"""

from __future__ import annotations

import hashlib
import inspect
import json
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path

import numpy as np

from simcache._files import atomic_output, check_input
from simcache.errors import SimcacheError
from simcache.trace import Trace

LOG_VERSION = 2
KEY = b"simcache_decisions"


def fingerprint(trace: Trace) -> str:
    """A short content hash of the routing (requests, positions, phases, experts)."""
    h = hashlib.sha1()
    for a in (trace.request, trace.position, trace.phase, trace.experts):
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:16]


def prior_hash(prior) -> str | None:
    """A short content hash of a prior's counts as the simulator reads them (float64)."""
    if prior is None:
        return None
    a = np.ascontiguousarray(prior, dtype=np.float64)
    return hashlib.sha1(repr(a.shape).encode() + a.tobytes()).hexdigest()[:16]


@dataclass(frozen=True)
class Settings:
    """What made a decision log: the simulate() arguments that change a decision, where the
    scored trace and the prior came from (with content hashes), and what priced the
    prediction (``calibration``, ``expert_bytes``: they change no decision)."""

    policy: str
    evict: str
    admit: str
    capacity: int
    scope: str
    batch: int
    prefill: str
    threshold: float | None  # tau; None where the policy does not read it
    horizon: int
    decay: float
    decay_every: int
    seed: int  # random eviction, and the request split
    split: float | None  # scored on this fraction of requests; the prior fitted on the rest
    prior: str | None  # the prior file as given to simulate (a trace or a .npy)
    prior_hash: str | None  # of the counts, however they were made (split or file)
    trace_hash: str  # of the scored trace (after the split)
    calibration: str | None
    expert_bytes: int | None
    miss: str = "load"  # who served a miss (--miss; CPU outcomes are decisions too)

    def simulate_options(self) -> dict:
        """Keyword arguments of :func:`simcache.simulate` that reproduce the decisions, given
        the scored trace and the prior (``simulate(trace, prior=prior, **options)``)."""
        from simcache.policies import PRESETS

        out = {f: getattr(self, f) for f in ("capacity", "evict", "admit", "scope", "batch", "prefill",
                                              "horizon", "decay", "decay_every", "seed", "miss")}
        out["policy"] = self.policy if self.policy in PRESETS else None  # else evict + admit say it
        if self.threshold is not None:
            out["threshold"] = self.threshold
        return out


@dataclass(frozen=True, eq=False)
class DecisionLog:
    group_ptr: np.ndarray  # (groups + 1,) int64
    keys: np.ndarray  # (accesses,) int32: layer * E + expert
    tokens: np.ndarray  # (accesses,) int32
    outcome: np.ndarray  # (accesses,) int8: 0 hit, 1 fill, 2 bypass, 3 forced bypass, 4 CPU,
    #                      5 served from a prefetch buffer (docs/prefetch.md)
    slot: np.ndarray  # (accesses,) int32: slot inside the pool (the buffer for 5), or -1
    victim: np.ndarray  # (accesses,) int32: evicted key, or -1
    meta: dict

    @property
    def num_layers(self) -> int:
        return int(self.meta["num_layers"])

    @property
    def num_experts(self) -> int:
        return int(self.meta["num_experts"])

    @property
    def settings(self) -> Settings:
        logged = self.meta["settings"]
        return Settings(**{f.name: logged[f.name] for f in fields(Settings)
                          if f.name in logged or f.default is MISSING})  # (a v2 log before miss: load)

    def check_trace(self, trace: Trace) -> None:
        """Raise unless this log was made from ``trace`` (the scored one, after any split)."""
        have, want = fingerprint(trace), self.settings.trace_hash
        if have != want:
            split = self.settings.split
            after = f" after its --split {split} (seed {self.settings.seed})" if split is not None else ""
            raise SimcacheError(
                f"the decision log does not match the trace: it was made from routing {want}, "
                f"this trace{after} has {have}"
            )

    def reproduce(self, trace: Trace, prior_path=None) -> tuple[Trace, np.ndarray | None]:
        """The scored trace and the prior of the logged run, from the trace file it was made
        from: the log's request split is redone and its prior refitted, or its prior file
        (``prior_path`` where it has moved) is read; both checked by content hash."""
        from simcache.transitions import load_prior, split_requests, transition_counts

        st = self.settings
        prior = None
        if st.split is not None:
            train, trace = split_requests(trace, st.split, st.seed)
        self.check_trace(trace)
        if st.split is not None:
            prior = transition_counts(train)
            source = f"the train requests of --split {st.split}"
        elif st.prior_hash is not None:
            source = prior_path if prior_path is not None else st.prior
            if source is None:
                raise SimcacheError("the decision log was made with a prior from no file: give --prior")
            prior = load_prior(source, trace.num_layers, trace.num_experts)
        if prior_hash(prior) != st.prior_hash:
            raise SimcacheError(f"the prior from {source} is not the one the decision log was made with "
                                f"(counts {prior_hash(prior)}, the log's {st.prior_hash})")
        return trace, prior

    def check_decisions(self, decisions) -> None:
        """Raise unless ``decisions`` (a re-simulation with this log's settings) are the logged ones."""
        pairs = list(zip((self.outcome, self.slot, self.victim),
                         (decisions.outcome, decisions.slot, decisions.victim)))
        if all(a.shape == b.shape and np.array_equal(a, b) for a, b in pairs):
            return
        n = min(self.outcome.shape[0], decisions.outcome.shape[0])
        differs = np.zeros(n, np.bool_)
        for a, b in pairs:
            differs |= a[:n] != b[:n]
        at = int(np.argmax(differs)) if differs.any() else n
        st = self.settings
        raise SimcacheError(f"this simulation decides differently from the decision log from access {at} on "
                            f"(the log: {st.policy}, capacity {st.capacity}, batch {st.batch}, prefill "
                            f"{st.prefill}, seed {st.seed}, prior {st.prior_hash or 'none'})")


def write_decisions(work, result, path, options: dict | None = None, *, prior_source=None,
                    split: float | None = None) -> Path:
    """Write the decisions of ``result``, simulated with ``record=True`` on ``work``.

    ``options`` are the keyword arguments that simulation was given (the same dict, so the
    log cannot disagree with the run; what it leaves out takes :func:`simcache.simulate`'s
    defaults). ``prior_source`` names the file the prior was read from; ``split`` the test
    fraction it was fitted beside.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    from simcache.simulator import simulate

    if result.decisions is None:
        raise SimcacheError("the result holds no decisions (simulate with record=True)")
    defaults = {k: p.default for k, p in inspect.signature(simulate).parameters.items()}
    opt = {**defaults, **(options or {})}
    horizon, decay, decay_every, seed, prior = (opt[k] for k in ("horizon", "decay", "decay_every", "seed", "prior"))
    d = work.demand
    L, E = d.num_layers, d.num_experts
    group_of = np.repeat(np.arange(d.group_ptr.shape[0] - 1, dtype=np.int64), np.diff(d.group_ptr))
    dec = result.decisions
    settings = Settings(
        policy=result.policy, evict=result.evict, admit=result.admit, capacity=result.capacity,
        scope=result.scope, batch=work.batch, prefill=work.prefill, threshold=result.threshold,
        horizon=int(horizon), decay=float(decay), decay_every=int(decay_every), seed=int(seed),
        split=None if split is None else float(split),
        prior=None if prior_source is None else str(prior_source), prior_hash=prior_hash(prior),
        trace_hash=fingerprint(work.trace), calibration=result.calibration, expert_bytes=result.expert_bytes,
        miss=result.miss,
    )
    meta = {
        "log_version": LOG_VERSION,
        "settings": asdict(settings),
        "model": work.trace.model,
        "num_layers": L,
        "num_experts": E,
        "top_k": work.trace.top_k,
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

    path = check_input(path, "decision log")
    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise SimcacheError(f"{path} is not a Parquet file ({str(exc).splitlines()[0]})") from None
    raw = (table.schema.metadata or {}).get(KEY)
    if raw is None:
        raise SimcacheError(f"{path} is not a simcache decision log")
    meta = json.loads(raw)
    if meta.get("log_version") != LOG_VERSION:
        raise SimcacheError(f"{path}: decision log version {meta.get('log_version')!r} not supported "
                            f"(this simcache writes version {LOG_VERSION}: simulate --decisions again)")
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
