"""Capture the shipped sample checkpoints again with --lookahead, on the CPU, teacher-forced over
exactly the token sequences their shipped traces record, and report look-ahead accuracy.

    PYTHONPATH=. python recipes/capture_lookahead.py [--models mixtral,olmoe] [--dtype bfloat16] [--out traces]

Each request of ``traces/trained-<model>.parquet`` becomes one sequence (its ``token_id`` in
position order, its domain as the label), captured through ``simcache.capture.capture_tokens``
into ``<out>/trained-<model>-lookahead.parquet``. The lookahead scores are then rounded to
bfloat16 precision (stored as float32; the capture's router logits are bfloat16, so this
drops digits the logits never had) to keep the file small. Printed: how often the new top-k
equals the shipped trace's, and per layer the look-ahead recall at width k and 2k.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import numpy as np

import simcache
from simcache import capture as cap
from simcache.trace import write_trace

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = {"mixtral": "trained-mixtral-8e", "olmoe": "trained-olmoe-32e"}


def sequences(trace):
    """(domain label, token ids) per request in request order, tokens in position order."""
    first = trace.layer == 0
    req, pos, tok = trace.request[first], trace.position[first], trace.token_id[first]
    dom = trace.domain[first] if trace.domain is not None else np.full(req.size, -1)
    order = np.lexsort((pos, req))
    req, pos, tok, dom = req[order], pos[order], tok[order], dom[order]
    cuts = np.flatnonzero(np.diff(req)) + 1
    out = []
    for r, p, t, d in zip(np.split(req, cuts), np.split(pos, cuts), np.split(tok, cuts), np.split(dom, cuts)):
        assert (p == np.arange(p.size)).all(), f"request {r[0]}: positions are not 0..n-1"
        out.append((trace.domains[d[0]] if d[0] >= 0 else None, t.astype(np.int64).tolist()))
    return out


def column(trace, col):
    """A column, with domain codes turned into their labels."""
    if col == "domain":
        return np.asarray(trace.domains, dtype=object)[trace.domain]
    return getattr(trace, col)


def round_bf16(x: np.ndarray) -> np.ndarray:
    """float32 values rounded to the nearest bfloat16 (round half to even), as float32."""
    u = np.ascontiguousarray(x, np.float32).view(np.uint32)
    u = (u + np.uint32(0x7FFF) + ((u >> 16) & 1)) & np.uint32(0xFFFF0000)
    return u.view(np.float32)


def recall(trace, width):
    """Per layer l < L-1: mean over tokens of |true experts of layer l+1 ∩ first ``width``
    lookahead ids of layer l| / k."""
    L, k = trace.num_layers, trace.top_k
    truth = trace.token_experts()  # (tokens, L, k)
    la = trace.lookahead.reshape(trace.num_tokens, L, -1)[:, :, :width]
    out = []
    for l in range(L - 1):
        hit = (truth[:, l + 1, :, None] == la[:, l, None, :]).any(axis=2)  # (tokens, k)
        out.append(float(hit.sum(axis=1).mean() / k))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="mixtral,olmoe")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--out", default=str(ROOT / "traces"))
    ap.add_argument("--batch-size", type=int, default=16)
    args = ap.parse_args()
    for name in args.models.split(","):
        shipped = simcache.read_trace(ROOT / "traces" / f"{SHIPPED[name]}.parquet")
        seqs = sequences(shipped)
        model, _, arch = cap.load_model(str(ROOT / "models" / name), dtype=args.dtype)
        out = Path(args.out) / f"{SHIPPED[name]}-lookahead.parquet"
        t0 = time.perf_counter()
        stats = cap.capture_tokens(
            model, arch, seqs, out, name=f"models/{name}", batch_size=args.batch_size, lookahead=True,
            overwrite=True, corpus=[f"token_id sequences of traces/{SHIPPED[name]}.parquet "
                                    f"({len(seqs)} requests)"])
        secs = time.perf_counter() - t0
        t = simcache.read_trace(out)
        meta = dict(t.metadata, lookahead_scores_precision="rounded to bfloat16, stored as float32",
                    device="cpu")
        t = dataclasses.replace(t, lookahead_scores=round_bf16(t.lookahead_scores), metadata=meta)
        write_trace(t, out)
        t = simcache.read_trace(out)
        for col in ("request", "position", "layer", "token_id", "domain"):
            same = np.array_equal(column(t, col), column(shipped, col))
            print(f"{name}: {col} equal to the shipped trace's: {same}")
        a, b = t.token_experts(), shipped.token_experts()
        set_a, set_b = np.sort(a, axis=2), np.sort(b, axis=2)
        print(f"{name}: {stats.tokens} tokens, {stats.requests} requests, {args.dtype} on the CPU, "
              f"{secs:.0f} s ({stats.tokens / secs:,.0f} tokens/s)")
        print(f"{name}: top-k equal to the shipped trace's (same set) in "
              f"{(set_a == set_b).all(axis=2).mean():.4f} of token-layer pairs, "
              f"top-1 equal in {(a[:, :, 0] == b[:, :, 0]).mean():.4f}")
        k, w = t.top_k, t.lookahead.shape[1]
        rk, r2k = recall(t, k), recall(t, w)
        for l in range(t.num_layers - 1):
            print(f"{name}: layer {l} -> {l + 1}: recall@{k} {rk[l]:.3f}  recall@{w} {r2k[l]:.3f}")
        print(f"{name}: mean over layers: recall@{k} {np.mean(rk):.3f}  recall@{w} {np.mean(r2k):.3f}")
        print(f"{name}: {out} {out.stat().st_size:,} bytes")


if __name__ == "__main__":
    main()
