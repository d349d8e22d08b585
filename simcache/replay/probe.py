"""Measure a GPU's transfer and expert-compute speeds: the timing model's calibration.

* pinned and pageable host-to-device bandwidth by copy size (GB/s, 1e9 bytes), device events
  around back-to-back copies after an untimed warm-up;
* per-copy latency (a 64-byte copy, median);
* the expert FFN of the eager issue path (the replay's own gather, SwiGLU and scatter, one
  expert) by token count, as device time: captured in a CUDA graph and replayed, so host
  launch gaps are left out;
* the grouped FFN of the fast issue path (:func:`simcache.replay.issue.expert_part`, the very
  call the replay makes) on n experts with t tokens each, by (n, t), the same way, plus the
  group's fixed work (gather, zeroing, sum) once; quantised experts include their gather and
  dequantisation;
* copy / compute overlap: an expert-sized copy on a side stream against FFNs on the default
  stream, both alone and together.

The result is a :class:`simcache.Calibration`; ``simcache probe --out calib.json`` writes it
for ``simcache simulate --calibration``.
"""

from __future__ import annotations

import sys
import time

import numpy as np
import torch

import simcache
from simcache.replay.experts import apply_expert, dequantise, quantise, stored_format
from simcache.replay.issue import check_fast, expert_part, split_weights
from simcache.replay.presets import Preset
from simcache.errors import SimcacheError

MIB = 1 << 20
COPY_SIZES = [256 << 10, 1 * MIB, 4 * MIB, 16 * MIB, 64 * MIB, 256 * MIB, 1024 * MIB]
TOKENS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048]
GROUP_EXPERTS = [1, 2, 4, 8, 16, 32, 64, 128, 256]  # clipped to the preset's expert count
GROUP_TOKENS = [1, 2, 4, 8, 16, 32, 64, 128]  # tokens per expert


def _copy_gbps(dev, size, pinned, min_seconds=0.05):
    src = torch.empty(size, dtype=torch.uint8, pin_memory=pinned)
    src.fill_(1)
    dst = torch.empty(size, dtype=torch.uint8, device=dev)
    for _ in range(2):
        dst.copy_(src, non_blocking=pinned)
    torch.cuda.synchronize(dev)
    reps = 1
    while True:
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(reps):
            dst.copy_(src, non_blocking=pinned)
        b.record()
        torch.cuda.synchronize(dev)
        t = a.elapsed_time(b) / 1e3
        if t >= min_seconds or reps >= 256:
            return size * reps / t / 1e9
        reps *= 4


def _latency_us(dev, reps=200):
    src = torch.ones(16, dtype=torch.float32, pin_memory=True)
    dst = torch.empty(16, device=dev)
    times = []
    for _ in range(reps):
        torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize(dev)
        times.append(time.perf_counter() - t0)
    return float(np.median(times) * 1e6)


def _experts(dev, preset, dtype, n, expert_dtype=None):
    """n random experts in their stored form: (n, Q)."""
    gen = torch.Generator(device=dev).manual_seed(0)
    rows = [quantise(torch.randn(preset.expert_elements(), generator=gen, device=dev) * preset.hidden ** -0.5,
                     expert_dtype, dtype, preset.hidden) for _ in range(n)]
    return torch.stack(rows)  # (n, Q)


def _graph_seconds(dev, loop, calls, reps=3):
    """Device seconds per call of ``loop`` (which makes ``calls`` calls): warmed up on a side
    stream, captured in a CUDA graph, replayed ``reps`` times between events. Where the calls
    cannot be captured, the loop itself is timed between events (host gaps included)."""
    side = torch.cuda.Stream(dev)
    side.wait_stream(torch.cuda.current_stream(dev))
    with torch.cuda.stream(side):
        loop()  # warm-up (and cuBLAS workspace) outside the capture
    torch.cuda.current_stream(dev).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            loop()
    except RuntimeError as exc:
        print(f"warning: CUDA graph capture failed ({str(exc).splitlines()[0]}); timing eagerly", file=sys.stderr)
        torch.cuda.synchronize(dev)
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(reps):
            loop()
        b.record()
        torch.cuda.synchronize(dev)
        return a.elapsed_time(b) / 1e3 / (reps * calls)
    graph.replay()
    torch.cuda.synchronize(dev)
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(reps):
        graph.replay()
    b.record()
    torch.cuda.synchronize(dev)
    del graph
    return a.elapsed_time(b) / 1e3 / (reps * calls)


def group_ffn_seconds(dev, preset: Preset, dtype, expert_dtype=None, experts=GROUP_EXPERTS,
                      tokens=GROUP_TOKENS, calls=8) -> dict:
    """The fast issue path's grouped FFN table (see the module docstring): device seconds of
    one :func:`expert_part` call on n experts with t tokens each, for every (n, t), and of the
    group's fixed work; ``calls`` calls per graph over windows of a pool of experts that
    rotate, so that small experts are not served from L2."""
    check_fast(dev, dtype)
    stored, per = stored_format(expert_dtype, dtype)
    eb = preset.expert_elements() // per * torch.tensor([], dtype=stored).element_size()
    ns = [n for n in experts if n <= max(preset.num_experts, 1)]
    per_expert = eb + (preset.expert_elements() * 2 if expert_dtype else 0)  # stored + dequantised
    budget = 0.4 * torch.cuda.mem_get_info(dev)[0]
    while len(ns) > 1 and 2 * ns[-1] * per_expert > budget:
        ns.pop()
    pool = _experts(dev, preset, dtype, 2 * ns[-1], expert_dtype)  # (P, Q)
    P = pool.shape[0]
    H, Fz = preset.hidden, preset.ffn
    table = []
    for n in ns:
        row = []
        for t in tokens:
            R = n * t
            xs = torch.randn((R, H), device=dev).to(dtype)  # (R, H)
            acc = torch.zeros((R, H), device=dev, dtype=torch.float32)  # (R, H)
            dest = torch.randperm(R, device=dev)  # (R,)
            gate = torch.rand((R, 1), device=dev)  # (R, 1)
            offs = (torch.arange(1, n + 1, device=dev) * t).to(torch.int32)  # (n,)
            starts = [(c * n) % (P - n + 1) for c in range(calls)]
            bufs = [torch.arange(s0, s0 + n, device=dev) for s0 in starts]

            def loop():
                for c in range(calls):
                    if expert_dtype is None:
                        w13, w2 = split_weights(pool[starts[c]: starts[c] + n], H, Fz)
                    else:
                        w13, w2 = split_weights(dequantise(pool.index_select(0, bufs[c]), expert_dtype, dtype, H),
                                                H, Fz)
                    expert_part(acc, xs, dest, gate, w13, w2, offs, Fz)

            row.append(_graph_seconds(dev, loop, calls))
            del xs, acc
        table.append(row)
    # the group's own work: gather its rows, zero the (n k, H) sums, add them up (16 tokens, top-k)
    k = max(preset.top_k, 1)
    x = torch.randn((16, H), device=dev).to(dtype)
    tok = torch.randint(0, 16, (16 * k,), device=dev)

    def fixed():
        for _ in range(calls):
            x.index_select(0, tok)  # (16 k, H)
            acc = torch.zeros((16 * k, H), dtype=torch.float32, device=dev)  # (16 k, H)
            acc.view(16, k, H).sum(1).to(dtype)  # (16, H)

    fixed_s = _graph_seconds(dev, fixed, calls)
    return {"experts": ns, "tokens": list(tokens), "seconds": table, "fixed_seconds": fixed_s,
            "expert_bytes": eb, "issue": "fast", "expert_dtype": expert_dtype}


def ffn_seconds(dev, preset: Preset, dtype, tokens=TOKENS, calls=20, expert_dtype=None):
    """Device seconds per expert FFN call of the eager path (gather, SwiGLU, weighted scatter;
    dequantisation first for quantised experts) by token count: ``calls`` calls over rotating
    experts captured in one CUDA graph, replayed and timed with events. Also returns the
    host-paced wall time per call of the same loop run eagerly."""
    experts = _experts(dev, preset, dtype, 4 if preset.expert_bytes() > 64 * MIB else 16, expert_dtype)
    device_s, wall_s = [], []
    for t in tokens:
        x = torch.randn((t, preset.hidden), device=dev).to(dtype)  # (T, H)
        y = torch.zeros_like(x)
        idx = torch.arange(t, device=dev)
        w = torch.ones((t, 1), device=dev, dtype=dtype)

        def loop():
            for c in range(calls):
                we = dequantise(experts[c % len(experts)], expert_dtype, dtype, preset.hidden)  # (W,)
                apply_expert(y, x, idx, w, we, preset.hidden, preset.ffn)

        device_s.append(_graph_seconds(dev, loop, calls))
        t0 = time.perf_counter()
        loop()
        torch.cuda.synchronize(dev)
        wall_s.append((time.perf_counter() - t0) / calls)
    return device_s, wall_s


def overlap_efficiency(dev, preset: Preset, dtype, tokens=64):
    """How much of the shorter of (one expert copy, FFNs of equal length) hides under the
    other when they run on two streams: 1 = perfect overlap, 0 = serialised."""
    size = preset.expert_bytes(torch.tensor([], dtype=dtype).element_size())
    src = torch.empty(size, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(size, dtype=torch.uint8, device=dev)
    side = torch.cuda.Stream(dev)
    (w,) = _experts(dev, preset, dtype, 1)
    x = torch.randn((tokens, preset.hidden), device=dev).to(dtype)
    y, idx = torch.zeros_like(x), torch.arange(tokens, device=dev)
    ones = torch.ones((tokens, 1), device=dev, dtype=dtype)

    def copy():
        with torch.cuda.stream(side):
            dst.copy_(src, non_blocking=True)

    def compute(n):
        for _ in range(n):
            apply_expert(y, x, idx, ones, w, preset.hidden, preset.ffn)

    def timed(fn):
        torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize(dev)
        return time.perf_counter() - t0

    timed(copy), timed(lambda: compute(2))
    t_copy = min(timed(copy) for _ in range(3))
    t_one = min(timed(lambda: compute(10)) for _ in range(3)) / 10
    n = max(1, int(round(t_copy / t_one)))
    t_comp = min(timed(lambda: compute(n)) for _ in range(3))
    t_both = min(timed(lambda: (copy(), compute(n))) for _ in range(3))
    hidden_part = t_copy + t_comp - t_both
    return float(max(0.0, min(1.0, hidden_part / min(t_copy, t_comp)))), t_copy, t_comp, t_both


def probe(dev: torch.device, preset: Preset, dtype: torch.dtype, sizes=COPY_SIZES, expert_dtype=None,
          grouped: bool = True) -> simcache.Calibration:
    """Every measurement above; ``grouped`` adds the fast path's grouped FFN table."""
    if dev.type != "cuda":
        raise SimcacheError("probe measures a GPU: give --gpu N")
    name = torch.cuda.get_device_name(dev)
    if grouped:
        check_fast(dev, dtype)
    pinned = [_copy_gbps(dev, s, True) for s in sizes]
    pageable = [_copy_gbps(dev, s, False) for s in sizes[::2]]
    latency = _latency_us(dev)
    ffn, ffn_wall = ffn_seconds(dev, preset, dtype, expert_dtype=expert_dtype)
    eff, t_copy, t_comp, t_both = overlap_efficiency(dev, preset, dtype)
    group = group_ffn_seconds(dev, preset, dtype, expert_dtype) if grouped else {}
    stored, per = stored_format(expert_dtype, dtype)
    eb = preset.expert_elements() // per * torch.tensor([], dtype=stored).element_size()
    return simcache.Calibration(
        device=name,
        copy_bytes=list(sizes),
        copy_gbps=[round(g, 3) for g in pinned],
        ffn_expert_bytes=eb,
        ffn_tokens=list(TOKENS),
        ffn_seconds=[float(f) for f in ffn],
        overlap=eff >= 0.7,
        source=f"simcache probe on {name}, preset {preset.name}, {str(dtype).replace('torch.', '')}"
               f"{', experts ' + expert_dtype if expert_dtype else ''}, torch {torch.__version__}",
        group_ffn=group,
        extra={
            "pageable_bytes": list(sizes[::2]),
            "pageable_gbps": [round(g, 3) for g in pageable],
            "copy_latency_us": latency,
            "overlap_efficiency": eff,
            "overlap_copy_s": t_copy,
            "overlap_compute_s": t_comp,
            "overlap_both_s": t_both,
            "preset": preset.name,
            "expert_dtype": expert_dtype,
            "ffn_wall_seconds": [float(f) for f in ffn_wall],
        },
    )
