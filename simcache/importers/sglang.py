"""SGLang expert-distribution recorder dumps, ``per_token`` mode.

Source: sgl-project/sglang, ``python/sglang/srt/eplb/expert_distribution.py``
(``_DetailSinglePassGatherer`` and ``_DetailAccumulator.dump``). With
``--expert-distribution-recorder-mode per_token`` the server writes, on
``/dump_expert_distribution_record``, one ``torch.save`` file per rank,
``expert_distribution_recorder_{time}_{rank}.pt``, holding::

    {"records": [ {"forward_pass_id": int, "rank": int, "gatherer_key": "primary",
                   "input_ids": [tokens], "positions": [tokens],
                   "extend_seq_lens": [per sequence] or None, "forward_mode": int,
                   "topk_ids_of_layer": int32 tensor [layers, tokens, 8],
                   "misc_objects": [...], "global_physical_count": tensor}, ... ],
     "last_physical_to_logical_map": tensor [layers, physical experts]}

``topk_ids_of_layer`` is reset to -1 before each pass and the router's top-k ids are written
into its first k columns, so -1 pads rows (8 = DeepSeek-V3's top-k, hard-coded there). The ids
are *physical* experts (expert-parallel replicas); ``last_physical_to_logical_map`` maps them
to logical experts, and we apply each dump's map to that dump's records (the source notes the
map may change while recording, EPLB rebalancing: the last one is the one dumped, so records
older than a rebalance inside one dump may be mapped with a newer map; the dump cannot tell). ``forward_mode`` is the ``ForwardMode`` enum of
``python/sglang/srt/model_executor/forward_batch_info.py``: EXTEND = 1, DECODE = 2, MIXED = 3,
IDLE = 4; speculative-decoding modes are refused.

The dump has no request ids (``rids`` is a TODO in the gatherer), so requests are rebuilt:
an extend segment (``extend_seq_lens``) at position 0 starts a request; any other segment or
decode token continues the earliest-started live request whose next position it is (a chunked
prefill's next chunk, the next decode token), or starts a new one (a prefix-cached prompt
whose first tokens were not computed). Two requests at the same position in one pass are told
apart by their order in the batch, which SGLang keeps for running requests; that is an
assumption, not something the dump records. Extend tokens are prefill (phase 0) unless they
continue a request already decoding (mixed chunked prefill); decode tokens are phase 1. The
forward pass becomes the ``step`` column, so ``--batch recorded`` replays the real batches.
Layers that hold no routing in the whole dump (dense layers such as DeepSeek's first three)
are left out and the rest renumbered from 0; the metadata lists them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from simcache.errors import SimcacheError
from simcache.importers._records import Records
from simcache.trace import NO_EXPERT

EXTEND, DECODE, MIXED, IDLE = 1, 2, 3, 4
RECORD_KEYS = ("input_ids", "positions", "forward_mode", "topk_ids_of_layer")


def read_dumps(paths: list[Path], rank: int | None = None) -> Records:
    """Records of one or more dump files (the records of one rank: ``rank``, default the
    lowest present; under tensor parallelism every rank records the same tokens)."""
    records, maps = [], {}
    for path in paths:
        data = _load(path)
        for i, r in enumerate(data["records"]):
            records.append((path, i, r))
        maps[path] = _physical_map(path, data["last_physical_to_logical_map"])
    ranks = sorted({int(r.get("rank", 0)) for _, _, r in records})
    if not ranks:
        raise SimcacheError(f"{paths[0]}: the dump holds no records (was recording started?)")
    use = ranks[0] if rank is None else int(rank)
    if use not in ranks:
        raise SimcacheError(f"no records of rank {use} (ranks present: {', '.join(map(str, ranks))})")
    records = [x for x in records if int(x[2].get("rank", 0)) == use]
    records.sort(key=lambda x: int(x[2].get("forward_pass_id", 0)))
    rebuild = _Requests()
    parts = {k: [] for k in ("request", "position", "phase", "token", "step", "experts")}
    n_layers = None
    for step, (path, i, r) in enumerate(records):
        where = f"{path}, record {i}"
        for key in RECORD_KEYS:
            if key not in r:
                raise SimcacheError(f"{where}: lacks '{key}' (not a per_token dump?)")
        ids = _array(r["topk_ids_of_layer"], where)
        if ids.ndim != 3:
            raise SimcacheError(f"{where}: topk_ids_of_layer must be [layers, tokens, k], got shape {ids.shape}")
        L, T, _ = ids.shape
        n_layers = L if n_layers is None else n_layers
        if L != n_layers:
            raise SimcacheError(f"{where}: {L} layers, earlier records have {n_layers}")
        positions = np.asarray(r["positions"], np.int64).reshape(-1)
        input_ids = np.asarray(r["input_ids"], np.int64).reshape(-1)
        if positions.size != T or input_ids.size != T:
            raise SimcacheError(f"{where}: {input_ids.size} input_ids and {positions.size} positions "
                                f"for {T} tokens in topk_ids_of_layer")
        mode = int(r["forward_mode"])
        if mode == IDLE or T == 0:
            continue
        if mode in (EXTEND, MIXED):
            lens = r.get("extend_seq_lens")
            if lens is None:
                raise SimcacheError(f"{where}: an extend pass without extend_seq_lens")
            lens = np.asarray(lens, np.int64).reshape(-1)
            if lens.sum() != T or (lens <= 0).any():
                raise SimcacheError(f"{where}: extend_seq_lens {lens.tolist()} do not add up to {T} tokens")
            req, phase = rebuild.extend(positions, lens)
        elif mode == DECODE:
            req, phase = rebuild.decode(positions)
        else:
            raise SimcacheError(f"{where}: forward mode {mode} (speculative decoding or other) is "
                                f"not supported; record without it")
        logical = _logical(ids, maps[path], where)  # [L, T, k]: this dump's own map
        parts["experts"].append(logical.transpose(1, 0, 2).reshape(T * L, -1))
        for key, v in (("request", req), ("position", positions), ("phase", phase),
                       ("token", input_ids), ("step", np.full(T, step))):
            parts[key].append(np.repeat(v.astype(np.int32), L))
    if not parts["experts"]:
        raise SimcacheError(f"{paths[0]}: the dump holds no tokens")
    experts = np.concatenate(parts["experts"])
    L = n_layers
    layer = np.tile(np.arange(L, dtype=np.int32), experts.shape[0] // L)
    used = np.zeros(L, np.bool_)
    used[np.unique(layer[experts[:, 0] != NO_EXPERT])] = True
    meta = {"sglang_rank": use, "capture": "SGLang expert-distribution recorder, per_token mode",
            "requests_rebuilt": "from positions and extend_seq_lens (the dump has no request ids)",
            "expert_ids": "logical (physical ids mapped by last_physical_to_logical_map)"}
    if not used.all():
        meta["dense_layers_left_out"] = np.flatnonzero(~used).tolist()
        renumber = np.cumsum(used) - 1
        keep = used[layer]
        experts, layer = experts[keep], renumber[layer[keep]]
        for key in ("request", "position", "phase", "token", "step"):
            parts[key] = [np.concatenate(parts[key])[keep]]
    width = int((experts != NO_EXPERT).sum(axis=1).max())
    return Records(
        request=np.concatenate(parts["request"]), position=np.concatenate(parts["position"]),
        layer=layer, experts=np.ascontiguousarray(experts[:, :max(width, 1)]),
        phase=np.concatenate(parts["phase"]).astype(np.int8), token_id=np.concatenate(parts["token"]),
        step=np.concatenate(parts["step"]), where=[(paths[0].name, 0)],
        metadata={**meta, "num_experts": max(int(m.max()) for m in maps.values()) + 1, "first_layer": 0,
                  "num_layers": int(used.sum())},
    )


class _Requests:
    """Rebuilds request identity pass by pass (see the module docstring)."""

    def __init__(self):
        self.count = 0
        self.waiting: dict[int, list[int]] = {}  # next position -> live requests, oldest first
        self.decoding: set[int] = set()

    def _continue(self, pos: int) -> int:
        queue = self.waiting.get(pos)
        if queue:
            r = queue.pop(0)
            if not queue:
                del self.waiting[pos]
            return r
        r = self.count
        self.count += 1
        return r

    def _advance(self, r: int, next_pos: int):
        self.waiting.setdefault(next_pos, []).append(r)

    def extend(self, positions, lens):
        req = np.empty(positions.size, np.int64)
        phase = np.zeros(positions.size, np.int8)
        start = 0
        for n in lens.tolist():
            p0 = int(positions[start])
            if p0 == 0:
                r = self.count
                self.count += 1
            else:
                r = self._continue(p0)
            req[start: start + n] = r
            if r in self.decoding:
                phase[start: start + n] = 1
            self._advance(r, int(positions[start + n - 1]) + 1)
            start += n
        return req, phase

    def decode(self, positions):
        req = np.empty(positions.size, np.int64)
        for i, p in enumerate(positions.tolist()):
            r = self._continue(int(p))
            req[i] = r
            self.decoding.add(r)
            self._advance(r, int(p) + 1)
        return req, np.ones(positions.size, np.int8)


def _load(path: Path) -> dict:
    import pickle

    import torch

    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError, OSError, ValueError) as exc:
        text = str(exc).strip().splitlines()
        raise SimcacheError(f"{path} is not a torch.save file ({text[0] if text else type(exc).__name__})") from None
    if not isinstance(data, dict) or "records" not in data:
        raise SimcacheError(f"{path}: not an SGLang per_token dump (needs a dict with 'records' and "
                            f"'last_physical_to_logical_map')")
    if "last_physical_to_logical_map" not in data:
        raise SimcacheError(f"{path}: lacks 'last_physical_to_logical_map' (needed to map physical "
                            f"expert ids to logical experts)")
    if not isinstance(data["records"], (list, tuple)):
        raise SimcacheError(f"{path}: 'records' must be a list of per-pass dicts")
    for i, r in enumerate(data["records"]):
        if not isinstance(r, dict):
            raise SimcacheError(f"{path}, record {i}: not a dict")
    return data


def _array(x, where) -> np.ndarray:
    try:
        import torch

        if isinstance(x, torch.Tensor):
            return x.cpu().numpy().astype(np.int32, copy=False)  # ids fit; half of int64's memory
        return np.asarray(x, np.int32)
    except (TypeError, ValueError):
        raise SimcacheError(f"{where}: topk_ids_of_layer is not an integer array") from None


def _physical_map(path, m) -> np.ndarray:
    a = _array(m, f"{path}: last_physical_to_logical_map")
    if a.ndim != 2:
        raise SimcacheError(f"{path}: last_physical_to_logical_map must be [layers, physical "
                            f"experts], got shape {a.shape}")
    return a


def _logical(ids: np.ndarray, phys_map: np.ndarray, where: str) -> np.ndarray:
    L, T, k = ids.shape
    if phys_map.shape[0] != L:
        raise SimcacheError(f"{where}: {L} layers but last_physical_to_logical_map has {phys_map.shape[0]}")
    P = phys_map.shape[1]
    real = ids != NO_EXPERT
    bad = real & ((ids < 0) | (ids >= P))
    if bad.any():
        l, t, j = (int(x[0]) for x in np.nonzero(bad))
        raise SimcacheError(f"{where}: physical expert {int(ids[l, t, j])} (layer {l}, token {t}) has no "
                            f"logical mapping (the map covers {P} physical experts)")
    flat = np.where(real, ids, 0).reshape(L, -1)
    logical = np.take_along_axis(phys_map, flat, axis=1).reshape(L, T, k)
    unmapped = real & (logical < 0)
    if unmapped.any():
        l, t, j = (int(x[0]) for x in np.nonzero(unmapped))
        raise SimcacheError(f"{where}: physical expert {int(ids[l, t, j])} at layer {l} maps to no "
                            f"logical expert ({int(logical[l, t, j])})")
    return np.where(real, logical, NO_EXPERT)
