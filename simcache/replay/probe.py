"""Measure a GPU's transfer and expert-compute speeds: the timing model's calibration.

* pinned and pageable host-to-device bandwidth by copy size (GB/s, 1e9 bytes), device events
  around back-to-back copies after an untimed warm-up;
* per-copy latency (a 64-byte copy, median);
* the expert FFN (the replay harness's own gather, SwiGLU and scatter) by token count, as
  device time: captured in a CUDA graph and replayed, so host launch gaps are left out;
* copy / compute overlap: an expert-sized copy on a side stream against FFNs on the default
  stream, both alone and together.

The result is a :class:`simcache.Calibration`; ``simcache probe --out calib.json`` writes it
for ``simcache simulate --calibration``.
"""

from __future__ import annotations

import time

import numpy as np
import torch

import simcache
from simcache.replay.experts import apply_expert
from simcache.replay.presets import Preset

MIB = 1 << 20
COPY_SIZES = [256 << 10, 1 * MIB, 4 * MIB, 16 * MIB, 64 * MIB, 256 * MIB, 1024 * MIB]
TOKENS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048]


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


def _experts(dev, preset, dtype, n):
    gen = torch.Generator(device=dev).manual_seed(0)
    return [(torch.randn(preset.expert_elements(), generator=gen, device=dev) * preset.hidden ** -0.5).to(dtype)
            for _ in range(n)]


def ffn_seconds(dev, preset: Preset, dtype, tokens=TOKENS, calls=20):
    """Device seconds per expert FFN call (gather, SwiGLU, weighted scatter) by token count:
    ``calls`` calls over rotating experts captured in one CUDA graph, replayed and timed with
    events. Also returns the host-paced wall time per call of the same loop run eagerly."""
    experts = _experts(dev, preset, dtype, 4 if preset.expert_bytes() > 64 * MIB else 16)
    device_s, wall_s = [], []
    for t in tokens:
        x = torch.randn((t, preset.hidden), device=dev).to(dtype)  # (T, H)
        y = torch.zeros_like(x)
        idx = torch.arange(t, device=dev)
        w = torch.ones((t, 1), device=dev, dtype=dtype)

        def loop():
            for c in range(calls):
                apply_expert(y, x, idx, w, experts[c % len(experts)], preset.hidden, preset.ffn)

        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):
            loop()  # warm-up (and cuBLAS workspace) outside the capture
        torch.cuda.current_stream(dev).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            loop()
        graph.replay()
        torch.cuda.synchronize(dev)
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(3):
            graph.replay()
        b.record()
        torch.cuda.synchronize(dev)
        device_s.append(a.elapsed_time(b) / 1e3 / (3 * calls))
        t0 = time.perf_counter()
        loop()
        torch.cuda.synchronize(dev)
        wall_s.append((time.perf_counter() - t0) / calls)
        del graph
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


def probe(dev: torch.device, preset: Preset, dtype: torch.dtype, sizes=COPY_SIZES) -> simcache.Calibration:
    name = torch.cuda.get_device_name(dev)
    pinned = [_copy_gbps(dev, s, True) for s in sizes]
    pageable = [_copy_gbps(dev, s, False) for s in sizes[::2]]
    latency = _latency_us(dev)
    ffn, ffn_wall = ffn_seconds(dev, preset, dtype)
    eff, t_copy, t_comp, t_both = overlap_efficiency(dev, preset, dtype)
    eb = preset.expert_bytes(torch.tensor([], dtype=dtype).element_size())
    return simcache.Calibration(
        device=name,
        copy_bytes=list(sizes),
        copy_gbps=[round(g, 3) for g in pinned],
        ffn_expert_bytes=eb,
        ffn_tokens=list(TOKENS),
        ffn_seconds=[float(f) for f in ffn],
        overlap=eff >= 0.7,
        source=f"simcache probe on {name}, preset {preset.name}, {str(dtype).replace('torch.', '')}, "
               f"torch {torch.__version__}",
        extra={
            "pageable_bytes": list(sizes[::2]),
            "pageable_gbps": [round(g, 3) for g in pageable],
            "copy_latency_us": latency,
            "overlap_efficiency": eff,
            "overlap_copy_s": t_copy,
            "overlap_compute_s": t_comp,
            "overlap_both_s": t_both,
            "preset": preset.name,
            "ffn_wall_seconds": [float(f) for f in ffn_wall],
        },
    )
