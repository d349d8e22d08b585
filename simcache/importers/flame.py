"""FLAME-MoE routing: the FLAME-MoE-290M sample file (docs/design.md §9) and the FLAME-MoE-Traces
folder layout.

The FLAME-MoE-Traces dataset (``CMU-FLAME/FLAME-MoE-Traces`` on Hugging Face, Apache-2.0) is
laid out as ``samples/NNN.parquet`` (the input token ids, column ``token_id``) and
``actives/iter_NNNN/layer_NN.parquet`` (per MoE layer and checkpoint iteration: ``scores`` and
``indices``, the router's top-k probabilities and expert ids). The hub is not reachable from
here, and the dataset's own writer is not public, so two details are assumptions, checked as
far as the files allow: the rows of every ``layer_NN.parquet`` follow the tokens of the sample
files in name order (``000`` first), as the ``.pt`` tensors of the DynaNDE-Simulator copy of the
same data do (``samples`` [sequences, tokens], ``indices`` / ``scores`` [sequences x tokens, k]),
and each sample file is one sequence (a request) unless its ``token_id`` column holds lists, one
sequence per row. A row-count mismatch is an error. Layer numbers come from the file names
(FLAME numbers its MoE layers from 2; they are renumbered from 0).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from simcache.errors import SimcacheError
from simcache.trace import Trace

# ---- FLAME-MoE-290M ------------------------------------------------------------------------

FLAME_LAYERS = 8
FLAME_EXPERTS = 64
FLAME_TOP_K = 6
# (1.3e9 total - 290e6 active) parameters sit in the 8 x (64 - 6) routed experts a token does
# not use, at 2 bytes each (bf16). The published counts are rounded, so this is an estimate.
FLAME_EXPERT_BYTES = int(round((1.3e9 - 290e6) / (FLAME_LAYERS * (FLAME_EXPERTS - FLAME_TOP_K)) * 2))


def import_flame(path) -> Trace:
    """Convert the FLAME-MoE-290M routing sample (``flame_moe_290m_iter5473_routing.parquet``).

    The sample holds one contiguous 2,048-token block (stream positions 0..2047) and the first
    10 tokens of 512-token windows r = 0..63 (stream position 512 r + p). Windows 0..3 lie
    inside the block, so the trace has request 0 = the block (positions 0..2047) and requests
    1..60 = windows 4..63 (positions 0..9 inside the window). Transformer layers 2..9 become
    MoE layers 0..7. The routing is teacher-forced over the pretraining stream, which is what
    decoding that text would route, so every token is marked decode (phase 1). The weights are
    the router's softmax probabilities of the chosen experts, not renormalised.
    """
    import pyarrow.parquet as pq

    path = Path(path)
    if not path.exists():
        raise SimcacheError(f"input file not found: {path}")
    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several types for a bad file
        raise SimcacheError(f"{path} is not a Parquet file ({str(exc).splitlines()[0]})") from None
    need = {"stream_idx", "layer", "token_id", "experts", "scores"}
    if not need <= set(table.column_names):
        raise SimcacheError(f"{path} is not the FLAME sample (needs columns {sorted(need)})")
    stream = table.column("stream_idx").to_numpy().astype(np.int64)
    layer = table.column("layer").to_numpy().astype(np.int64) - 2
    exp = np.asarray(table.column("experts").combine_chunks().flatten().to_numpy()).reshape(-1, FLAME_TOP_K)
    scores = np.asarray(table.column("scores").combine_chunks().flatten().to_numpy()).reshape(-1, FLAME_TOP_K)
    window = stream // 512
    in_block = stream < 2048
    request = np.where(in_block, 0, window - 3)
    position = np.where(in_block, stream, stream % 512)
    return Trace.from_arrays(
        exp,
        request=request,
        position=position,
        layer=layer,
        num_experts=FLAME_EXPERTS,
        phase=np.ones(stream.shape[0], np.int8),
        weights=scores,
        token_id=table.column("token_id").to_numpy(),
        num_layers=FLAME_LAYERS,
        model="FLAME-MoE-290M (iteration 5473)",
        architecture="flame-moe (Megatron; 64 routed + 2 shared experts, top-6)",
        expert_bytes=FLAME_EXPERT_BYTES,
        expert_bytes_note="estimated from the published parameter counts: "
        "(1.3e9 - 290e6) / (8 layers x 58 unused experts) x 2 bytes (bf16)",
        dtype="bfloat16",
        capture="teacher-forced over the pretraining token stream (prefill-style routing)",
        corpus="FLAME-MoE pretraining stream, shard 0-0",
        weights_note="router softmax probability of each chosen expert over 64 experts, not renormalised",
        source="CMU-FLAME/FLAME-MoE-Traces (Apache-2.0), sample redistributed by "
        "Akash-N-Pai/DynaNDE-Simulator@f274466b; layers 2-9 only (10-26 in that repo are copies)",
        license="Apache-2.0",
    )


def read_flame_traces(folder: Path, iteration: int | None = None):
    """Records of a FLAME-MoE-Traces folder (see the module docstring); ``iteration`` picks
    ``actives/iter_NNNN`` (default: the highest)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from simcache.importers._records import Records

    folder = Path(folder)
    samples = sorted((folder / "samples").glob("*.parquet"))
    if not samples:
        raise SimcacheError(f"{folder}/samples holds no .parquet files")
    iters = {}
    for d in (folder / "actives").glob("iter_*"):
        m = re.fullmatch(r"iter_(\d+)", d.name)
        if m and d.is_dir():
            iters[int(m.group(1))] = d
    if not iters:
        raise SimcacheError(f"{folder}/actives holds no iter_NNNN folders")
    if iteration is None:
        iteration = max(iters)
    if iteration not in iters:
        raise SimcacheError(f"{folder}/actives has no iter_{iteration:04d} (has {', '.join(map(str, sorted(iters)))})")
    layer_files = {}
    for f in iters[iteration].glob("layer_*.parquet"):
        m = re.fullmatch(r"layer_(\d+)\.parquet", f.name)
        if m:
            layer_files[int(m.group(1))] = f
    if not layer_files:
        raise SimcacheError(f"{iters[iteration]} holds no layer_NN.parquet files")

    def table(path, columns):
        try:
            t = pq.read_table(path)
        except (pa.ArrowInvalid, OSError) as exc:
            raise SimcacheError(f"{path} is not a Parquet file ({str(exc).splitlines()[0]})") from None
        missing = [c for c in columns if c not in t.column_names]
        if missing:
            raise SimcacheError(f"{path} lacks column(s) {', '.join(missing)} (has {', '.join(t.column_names)})")
        return t

    req_parts, pos_parts, tok_parts = [], [], []
    n_req = 0
    for f in samples:
        col = table(f, ["token_id"]).column("token_id").combine_chunks()
        if pa.types.is_list(col.type) or pa.types.is_large_list(col.type):
            import pyarrow.compute as pc

            lengths = pc.list_value_length(col).to_numpy(zero_copy_only=False).astype(np.int64)
            tok = pc.list_flatten(col).to_numpy(zero_copy_only=False)
            req_parts.append(np.repeat(np.arange(n_req, n_req + lengths.size), lengths))
            pos_parts.append(np.arange(tok.size) - np.repeat(np.r_[0, np.cumsum(lengths)[:-1]], lengths))
            n_req += lengths.size
        else:
            tok = col.to_numpy(zero_copy_only=False)
            req_parts.append(np.full(tok.size, n_req))
            pos_parts.append(np.arange(tok.size))
            n_req += 1
        tok_parts.append(tok.astype(np.int64))
    req = np.concatenate(req_parts)
    pos = np.concatenate(pos_parts)
    tok = np.concatenate(tok_parts)
    n = req.size
    experts, weights, layers = [], [], []
    for number in sorted(layer_files):
        f = layer_files[number]
        t = table(f, ["indices", "scores"])
        if t.num_rows != n:
            raise SimcacheError(f"{f} has {t.num_rows:,} rows but the samples hold {n:,} tokens")
        idx = np.asarray(t.column("indices").combine_chunks().flatten().to_numpy(zero_copy_only=False))
        sc = np.asarray(t.column("scores").combine_chunks().flatten().to_numpy(zero_copy_only=False))
        if idx.size % n or sc.size != idx.size:
            raise SimcacheError(f"{f}: 'indices' and 'scores' must hold the same k entries per row")
        k = idx.size // n
        experts.append(idx.astype(np.int64).reshape(n, k))
        weights.append(sc.astype(np.float32).reshape(n, k))
        layers.append(np.full(n, number))
    L = len(layers)
    rec = Records(
        request=np.tile(req, L), position=np.tile(pos, L), layer=np.concatenate(layers),
        experts=np.concatenate(experts), weights=np.concatenate(weights), token_id=np.tile(tok, L),
        where=[(f"{iters[iteration].name}/{layer_files[x].name}", i * n) for i, x in enumerate(sorted(layer_files))],
        metadata={"capture": "teacher-forced over the FLAME-MoE pretraining stream",
                  "flame_iteration": int(iteration), "weights_note": "router top-k scores as stored"},
    )
    return rec
