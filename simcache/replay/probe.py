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
  stream, both alone and together;
* the host CPU (docs/design.md §11): the expert FFN on the host by token count at a few thread counts,
  alone and while expert copies run, the copies' slowdown, the thread count that serves misses
  fastest, and the activation round trip device -> host -> device (:func:`probe_host`).

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
          grouped: bool = True, cpu_threads: str | None = "8,12,all") -> simcache.Calibration:
    """Every measurement above; ``grouped`` adds the fast path's grouped FFN table and, unless
    ``cpu_threads`` is None, the host CPU's tables (:func:`probe_host`)."""
    if dev.type != "cuda":
        raise SimcacheError("probe measures a GPU: give --gpu N")
    name = torch.cuda.get_device_name(dev)
    if grouped:
        check_fast(dev, dtype)
    host = probe_host(dev, preset, dtype, cpu_threads) if cpu_threads is not None else {"extra": {}}
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
            **host.pop("extra"),
        },
        **host,
    )


# ---- the host CPU as an executor (docs/design.md §11) -----------------------------------------------

CPU_TOKENS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048]
ROUNDTRIP_TOKENS = [1, 16, 256, 2048]
HANDOFF_FFN = 256  # the FFN size of the hand-off probe's expert (3 x 256 x hidden weights)


class _Copies:
    """Expert-sized copies back to back on a background thread while the block runs: pinned
    host -> device on a side stream on a GPU, host -> host on a CPU-only run (tests). Each copy
    reads the next of ``rows`` distinct source rows (default :func:`rotation`'s count, together
    at least 1 GiB), as a replay's copies read distinct experts (copies of one buffer might be
    served from the host's last-level cache; on the H200 host the two slowed the FFN alike,
    docs/hybrid.md run 5). Records the seconds of each copy."""

    def __init__(self, dev, nbytes, rows: int | None = None):
        self.dev = dev
        cuda = dev.type == "cuda"
        n = rotation(nbytes) if rows is None else int(rows)
        self.src = torch.empty((n, nbytes), dtype=torch.uint8, pin_memory=cuda)  # (n, bytes)
        self.src.fill_(1)
        self.dst = torch.empty(nbytes, dtype=torch.uint8, device=dev)
        self.stream = torch.cuda.Stream(dev) if cuda else None
        self.times: list[float] = []
        self._next = 0
        self._stop = None

    def one(self):
        src = self.src[self._next % self.src.shape[0]]
        self._next += 1
        t0 = time.perf_counter()
        if self.stream is not None:
            with torch.cuda.stream(self.stream):
                self.dst.copy_(src, non_blocking=True)
            self.stream.synchronize()
        else:
            self.dst.copy_(src)
        return time.perf_counter() - t0

    def __enter__(self):
        import threading

        self._stop = threading.Event()
        self.times = []

        def loop():
            while not self._stop.is_set():
                self.times.append(self.one())

        self._thread = threading.Thread(target=loop, daemon=True)
        self._thread.start()
        while not self.times:  # copies are under way before the block starts
            time.sleep(1e-4)
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def host_ffn_seconds(preset: Preset, dtype, tokens=CPU_TOKENS, copies: "_Copies | None" = None,
                     min_seconds=0.05, max_calls=400, min_calls=5, experts: torch.Tensor | None = None,
                     raw: bool = False):
    """Host seconds of one expert's SwiGLU FFN by token count, at torch's current thread count:
    distinct experts in rotation, together at least 1 GiB (:func:`rotation`: no expert stays in
    the CPU caches between its calls, as in a replay's expert store), two untimed calls
    first, then timed calls until ``min_seconds`` have passed and at least ``min_calls`` ran
    (at most ``max_calls``); the median call. With ``copies``, expert copies run on a
    background thread meanwhile. ``experts`` (:func:`host_experts`; made here if not given) are
    the rows in rotation. With ``raw``, every timed call's seconds per token count instead of
    the median. (A mean of at most 20 calls let one slow call -- a thread pool waking, a page
    fault -- set a small expert's figure: 3.0 ms for a 0.7 ms FFN.)"""
    from simcache.replay.experts import ffn

    gen = torch.Generator().manual_seed(1)
    if experts is None:
        experts = host_experts(preset, dtype)
    n = experts.shape[0]
    out = []
    ctx = copies if copies is not None else _Null()
    with ctx:
        for t in tokens:
            x = torch.randn((t, preset.hidden), generator=gen).to(dtype)  # (T, H)
            for e in (1, 2):
                ffn(x, experts[e], preset.hidden, preset.ffn)
            times, t0 = [], time.perf_counter()
            while True:
                c0 = time.perf_counter()
                ffn(x, experts[len(times) % n], preset.hidden, preset.ffn)
                times.append(time.perf_counter() - c0)
                if len(times) >= max_calls or (len(times) >= min_calls and c0 - t0 >= min_seconds):
                    break
            out.append(times if raw else float(np.median(times)))
    return out


def host_experts(preset: Preset, dtype, pin: bool = False) -> torch.Tensor:
    """Experts for :func:`host_ffn_seconds`, (n, W): :func:`rotation`'s count of random rows of
    one buffer, pinned with ``pin`` (the memory a replay's expert store is on a GPU machine)."""
    gen = torch.Generator().manual_seed(0)
    n = rotation(preset.expert_elements() * torch.tensor([], dtype=dtype).element_size())
    experts = torch.empty((n, preset.expert_elements()), dtype=dtype, pin_memory=pin)  # (n, W)
    for row in experts:
        row.copy_(torch.randn(preset.expert_elements(), generator=gen) * preset.hidden ** -0.5)
    return experts


def rotation(expert_bytes: int, floor: int = 4, ceiling: int = 64, total: int = 1 << 30) -> int:
    """Experts the host probe rotates through: enough that together they exceed the CPU caches
    (``total`` bytes), at least ``floor``, at most ``ceiling``. Four 16.5 MiB DeepSeek-V2-Lite
    experts (66 MiB) can sit in a server's last-level cache; with four, the probe's FFN ran 1.6x
    faster than the same FFN on the replay's 8 GiB expert store (docs/hybrid.md, run 4), the
    cache the likely cause.

    >>> rotation(352 * 2**20), rotation(int(16.5 * 2**20)), rotation(1000)
    (4, 63, 64)
    """
    return int(min(ceiling, max(floor, -(-total // max(int(expert_bytes), 1)))))


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass


def roundtrip_seconds(dev, hidden, dtype, tokens=ROUNDTRIP_TOKENS, reps=50):
    """Median seconds to send tokens x hidden activations device -> host (pinned) -> device,
    by token count; on a CPU-only run, two host copies."""
    cuda = dev.type == "cuda"
    out = []
    for t in tokens:
        x = torch.randn((t, hidden), device=dev).to(dtype)  # (T, H)
        host = torch.empty((t, hidden), dtype=dtype, pin_memory=cuda)  # (T, H)
        back = torch.empty_like(x)
        times = []
        for _ in range(reps + 2):
            if cuda:
                torch.cuda.synchronize(dev)
            t0 = time.perf_counter()
            host.copy_(x, non_blocking=cuda)
            if cuda:
                torch.cuda.synchronize(dev)
            back.copy_(host, non_blocking=cuda)
            if cuda:
                torch.cuda.synchronize(dev)
            times.append(time.perf_counter() - t0)
        out.append(float(np.median(times[2:])))
    return out


def fit_roundtrip(tokens, seconds, token_bytes):
    """(one-way latency s, GB/s) from round-trip times: least squares of rt/2 on bytes."""
    b = np.asarray(tokens, float) * token_bytes
    y = np.asarray(seconds, float) / 2
    slope, intercept = np.polyfit(b, y, 1) if len(b) >= 2 else (0.0, float(y[0]))
    latency = max(float(intercept), 0.0)
    gbps = 1.0 / (slope * 1e9) if slope > 0 else 0.0
    return latency, gbps


def host_threads(spec: str) -> list[int]:
    """``"8,12,all"`` -> thread counts (``all``: every core this process may use), sorted."""
    from simcache.errors import SimcacheError
    from simcache.replay.cpu import _cores

    out = set()
    for part in str(spec).split(","):
        part = part.strip()
        if part == "all":
            out.add(_cores())
        elif part:
            try:
                n = int(part)
            except ValueError:
                raise SimcacheError(f"--cpu-threads must look like 8,12,all, got {spec!r}") from None
            if n < 1:
                raise SimcacheError(f"--cpu-threads must be positive, got {n}")
            out.add(min(n, _cores()))
    if not out:
        raise SimcacheError(f"--cpu-threads names no thread count: {spec!r}")
    return sorted(out)


def host_handoff_seconds(dev, hidden: int, dtype, threads: int, min_seconds=0.2, min_calls=20,
                         ffn_size: int = HANDOFF_FFN, roundtrip_s: float | None = None) -> float:
    """The CPU path's fixed cost per group (the calibration's ``cpu_group_s``), measured through
    the replay's own :class:`~simcache.replay.cpu.HostExecutor`: one 1-token expert submitted,
    finished into a device output and synchronised, over and over; per call its seconds less
    the expert's host FFN (the executor's own clock of it) and less one activation round trip
    (which the model prices per expert); the median. What remains is the hand-off: the worker
    waking and waiting for the gather, the issuing thread waking for the result and adding it.
    A small expert (``ffn_size``) keeps the FFN, and its noise, out of the figure.
    ``roundtrip_s``: the 1-token round trip, if already measured (:func:`roundtrip_seconds`)."""
    from simcache.replay.cpu import HostExecutor, Job

    w = (torch.randn(3 * ffn_size * hidden, generator=torch.Generator().manual_seed(2)) * hidden ** -0.5).to(dtype)
    w = w.pin_memory() if dev.type == "cuda" else w  # (W,)
    x = torch.randn((1, hidden), device=dev).to(dtype)  # (1, H)
    job = Job(w, torch.zeros(1, dtype=torch.long, device=dev), torch.ones((1, 1), dtype=dtype, device=dev))
    rt = roundtrip_seconds(dev, hidden, dtype, tokens=[1])[0] if roundtrip_s is None else roundtrip_s
    out = torch.zeros_like(x)
    left = []
    with HostExecutor(hidden, ffn_size, dev, threads, max_tokens=1, dtype=dtype) as ex:
        t0 = time.perf_counter()
        while len(left) < min_calls + 2 or time.perf_counter() - t0 < min_seconds:
            c0 = time.perf_counter()
            ticket = ex.submit(x, [job])
            ex.finish(ticket, out)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            left.append(time.perf_counter() - c0 - ticket.ffn_s[0] - rt)
    return max(float(np.median(left[2:])), 0.0)  # (two untimed)


def group_issue_seconds(dev, hidden: int, dtype, top_k: int = 2, experts: int = 2, reps: int = 30,
                        ffn_size: int = HANDOFF_FFN) -> float:
    """Host seconds to issue one decode group of the fast path with nothing queued ahead of it
    (the median of ``reps``, each between synchronisations): the gather of its rows, the (n k, H)
    sums, one load's copy between two events, the grouped FFNs of the hits and of the loads
    (``experts`` one-token experts each), the sum and the group's event. Part of the
    calibration's ``cpu_group_s``: a group with CPU work holds the issuing thread until the
    CPU's results are in, so the launch queue drains, and the next group's issue is exposed
    whenever the CPU path is the group's longest (where the GPU path is longer the model's
    max() hides it, as the replay does). A small expert (``ffn_size``): issuing a call costs
    the same whatever its shapes."""
    cuda = dev.type == "cuda"
    gen = torch.Generator().manual_seed(4)
    w = (torch.randn((2 * experts, 3 * ffn_size * hidden), generator=gen) * hidden ** -0.5).to(dtype).to(dev)
    w13, w2 = split_weights(w, hidden, ffn_size)  # (2e, H, 2F), (2e, F, H)
    host = torch.empty(w.shape[1], dtype=dtype, pin_memory=cuda)  # (W,) one load's source
    n, k = 1, max(int(top_k), 1)
    x = torch.randn((n, hidden), generator=gen).to(dtype).to(dev)  # (n, H)
    tok = torch.zeros(2 * experts, dtype=torch.long, device=dev)  # (R,)
    dest = torch.arange(2 * experts, device=dev) % (n * k)  # (R,)
    gate = torch.rand((2 * experts, 1), generator=gen).to(dev)  # (R, 1) float32
    offs = torch.arange(1, experts + 1, dtype=torch.int32, device=dev)  # (e,)
    stream = torch.cuda.Stream(dev) if cuda else None
    times = []
    for _ in range(reps + 2):
        if cuda:
            torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        xs = x.index_select(0, tok)  # (R, H)
        acc = torch.zeros((n * k, hidden), dtype=torch.float32, device=dev)  # (n k, H)
        if cuda:
            with torch.cuda.stream(stream):
                a, b = torch.cuda.Event(), torch.cuda.Event()
                a.record()
                w[-1].copy_(host, non_blocking=True)
                b.record()
        else:
            w[-1].copy_(host)
        expert_part(acc, xs[:experts], dest[:experts], gate[:experts], w13[:experts], w2[:experts], offs, ffn_size)
        if cuda:
            torch.cuda.current_stream(dev).wait_event(b)
        expert_part(acc, xs[experts:], dest[experts:], gate[experts:], w13[experts:], w2[experts:], offs, ffn_size)
        acc.view(n, k, hidden).sum(1).to(dtype)  # (n, H)
        if cuda:
            torch.cuda.Event().record()
        times.append(time.perf_counter() - t0)
    return float(np.median(times[2:]))  # (two untimed)


def _median_of_passes(times) -> list[list[float]]:
    """[thread count][token count][pass] -> lists of calls; the median of each pass's median
    (each pass runs for a fixed time, so pooling the calls would weigh a fast pass more).

    >>> _median_of_passes([[[[1.0, 1.0, 1.0], [5.0], [2.0, 9.0, 2.0]]]])
    [[2.0]]
    """
    return [[float(np.median([np.median(p) for p in cell])) for cell in row] for row in times]


def busy_from_pairs(alone_t, busy_t) -> list[list[float]]:
    """The FFN while copies run: the alone figure times the median, over passes, of each
    pass's busy/alone ratio, and never below the alone figure. Each pass measures one token
    count alone and then busy, back to back, so a ratio compares two rates a fraction of a
    second apart; the host's rate drifts by a third over seconds (docs/hybrid.md), and two
    separate medians can put the busy figure below the alone one (run 6: 7.15 ms busy against
    8.95 alone at 12 threads), which prices the CPU faster when copies run beside it. Copies
    share the host's memory: they do not speed its FFN up, so a ratio below 1 is read as 1.

    >>> alone = [[[[10.0], [12.0], [11.0]], [[2.0], [2.0], [2.0]]]]
    >>> busy = [[[[9.0], [10.0], [10.0]], [[3.0], [3.2], [2.8]]]]
    >>> busy_from_pairs(alone, busy)
    [[11.0, 3.0]]
    """
    alone = _median_of_passes(alone_t)
    out = []
    for a_row, at_row, bt_row in zip(alone, alone_t, busy_t):
        row = []
        for a, at, bt in zip(a_row, at_row, bt_row):
            ratio = float(np.median([np.median(b) / np.median(x) for x, b in zip(at, bt)]))
            row.append(a * max(ratio, 1.0))
        out.append(row)
    return out


def probe_host(dev, preset: Preset, dtype, threads: str = "8,12,all", tokens=CPU_TOKENS,
               min_seconds=0.05, rounds: int = 3) -> dict:
    """The host CPU's part of a calibration (the ``cpu_*`` and ``act_*`` fields of
    :class:`simcache.Calibration`): for each thread count, the expert FFN by token count alone
    and while expert copies run, and the copies' slowdown; the thread count that serves misses
    fastest (:func:`simcache.timing.choose_threads`); the activation round trip; the CPU path's
    hand-off per group at the chosen thread count (:func:`host_handoff_seconds`, plus the next
    group's issue, :func:`group_issue_seconds`, which a CPU group exposes). The FFN
    figures are medians over ``rounds`` passes through every thread count and token count,
    each token count alone and then busy, back to back (``min_seconds`` each): the host's FFN
    rate drifts by a third over seconds (docs/hybrid.md), and one pass would price a token
    count by whichever rate held while it ran; the busy figure is the alone one times the
    pairs' ratio (:func:`busy_from_pairs`)."""
    from simcache.replay.cpu import cpu_model, set_host_threads
    from simcache.timing import choose_threads

    threads = host_threads(threads)
    before = torch.get_num_threads()
    eb = preset.expert_bytes(torch.tensor([], dtype=dtype).element_size())
    copies = _Copies(dev, eb)
    experts = host_experts(preset, dtype, pin=dev.type == "cuda")
    copy_alone = float(np.median([copies.one() for _ in range(12)][3:]))  # 3 untimed
    k = len(tokens)
    alone_t = [[[] for _ in range(k)] for _ in threads]  # [thread count][token count]: each pass's calls
    busy_t = [[[] for _ in range(k)] for _ in threads]
    copy_t = [[] for _ in threads]
    try:
        for _ in range(rounds):
            for i, n in enumerate(threads):
                set_host_threads(n)
                for j, t in enumerate(tokens):  # alone, then busy, back to back (busy_from_pairs)
                    alone_t[i][j].append(host_ffn_seconds(preset, dtype, [t], min_seconds=min_seconds,
                                                          experts=experts, raw=True)[0])
                    busy_t[i][j].append(host_ffn_seconds(preset, dtype, [t], copies=copies,
                                                         min_seconds=min_seconds, experts=experts, raw=True)[0])
                    copy_t[i].append(float(np.median(copies.times)))  # (one figure per pass and count)
        alone, busy = _median_of_passes(alone_t), busy_from_pairs(alone_t, busy_t)
        # (a copy beside the CPU's FFN is not sped up by it: a ratio below 1 is noise, read as 1)
        slow = [max(float(np.median(times)) / copy_alone, 1.0) if times else 1.0 for times in copy_t]
        choice = choose_threads(threads, busy, slow, copy_alone, tokens)
        rt = roundtrip_seconds(dev, preset.hidden, dtype)  # (ROUNDTRIP_TOKENS: 1 token first)
        handoff = host_handoff_seconds(dev, preset.hidden, dtype, choice, roundtrip_s=rt[0])
        issue = group_issue_seconds(dev, preset.hidden, dtype, top_k=preset.top_k)
    finally:
        torch.set_num_threads(before)
    token_bytes = preset.hidden * torch.tensor([], dtype=dtype).element_size()
    latency, gbps = fit_roundtrip(ROUNDTRIP_TOKENS, rt, token_bytes)
    return dict(
        cpu_model=cpu_model(), cpu_dtype=str(dtype).replace("torch.", ""), cpu_expert_bytes=eb, cpu_call_s=0.0,
        cpu_threads=threads, cpu_tokens=list(tokens), cpu_seconds=alone, cpu_busy_seconds=busy,
        cpu_copy_slowdown=slow, cpu_thread_choice=choice, cpu_group_s=handoff + issue,
        act_token_bytes=token_bytes, act_latency_s=latency, act_gbps=gbps,
        extra={"host_copy_alone_s": copy_alone, "cpu_handoff_executor_s": handoff, "group_issue_s": issue,
               "roundtrip_tokens": list(ROUNDTRIP_TOKENS),
               "roundtrip_seconds": rt, "cpu_rounds": rounds,
               "cpu_seconds_spread": [[[float(np.percentile(np.concatenate(c), q)) for q in (10, 90)] for c in row]
                                      for row in alone_t]},
    )
