"""The host CPU as a third executor (docs/design.md §11): experts computed where their weights live.

For a (step, layer) the schedule sends some misses to the CPU. :class:`HostExecutor` runs them
on one worker thread while the GPU streams proceed: the issuing thread gathers the CPU experts'
tokens on the device into a pinned host buffer (see ``upload`` below for how), then the worker,
one expert at a time, computes the SwiGLU FFN on the
host with torch at the probed thread count into a pinned host buffer. The results come up one
of two ways (``upload``): ``read`` (on CUDA where Triton is installed and its self-check passes),
a small kernel on the compute stream reads the pinned buffer over PCIe from the GPU's own
threads, so the results never queue behind the group's weight copies on the copy engine
(docs/hybrid.md run 6: 1-4 ms at batch 16), and the same kernel, pointers swapped, stores the
gathered tokens straight into the pinned host buffer on the compute stream (no copy down);
``copy``, the worker copies the tokens down on the executor's stream, sends each result up as
soon as it is computed and waits for the last. The timing model prices
one activation round trip per expert (docs/design.md §11). The compute stream waits for the
CPU's results only when it adds them into the layer output, so the GPU computes its own
experts meanwhile. On a CPU-only run (tests) the same code runs with host tensors and no
streams.

Tensor dimensions used in shape comments:
    H  hidden size            W = 3 * F * H  elements per expert
    n  tokens in the step     T  tokens routed to one expert
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from simcache.errors import SimcacheError
from simcache.replay.experts import ffn

_THREADS_LOCK = threading.Lock()


def set_host_threads(threads: int | None) -> int:
    """Set torch's intra-op thread count (``None`` or 0: every core); returns the count."""
    n = int(threads) if threads else _cores()
    if n < 1:
        raise SimcacheError(f"host thread count must be positive, got {threads}")
    with _THREADS_LOCK:
        torch.set_num_threads(n)
    return n


def _cores() -> int:
    import os

    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def cpu_model() -> str:
    """The host CPU's model name (from /proc/cpuinfo), with its core count."""
    name = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{name or 'unknown CPU'} ({_cores()} cores available)"


def zero_copy_reader():
    """A function ``read(dst, src)`` that copies a contiguous pinned host tensor into a device
    tensor of the same shape and dtype by a Triton kernel on the current stream: the GPU's own
    threads load the host memory over PCIe (pinned memory is mapped into the device's address
    space), with no copy engine involved. None where Triton is not installed."""
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None

    @triton.jit
    def _read(src, dst, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        tl.store(dst + offs, tl.load(src + offs, mask=mask, volatile=True), mask=mask)

    block = 2048

    def read(dst: torch.Tensor, src: torch.Tensor) -> None:
        n = dst.numel()
        if n:
            _read[(triton.cdiv(n, block),)](src, dst, n, BLOCK=block)

    return read


def checked_reader(device: torch.device, make=zero_copy_reader):
    """:func:`zero_copy_reader` after a self-check on ``device``: it must copy a pinned block of
    random bf16 rows to the device exactly, and a device block into pinned host memory (the
    same kernel, pointers swapped: the executor sends activations down that way); None (the
    executor then copies both ways on its stream) if
    Triton is missing, the kernel fails to build or launch, or a value differs. A fault that
    leaves the device unusable is a one-line error instead: no fallback could run after it."""
    read = make()
    if read is None:
        return None
    try:
        gen = torch.Generator().manual_seed(3)
        src = torch.randn((37, 129), generator=gen).to(torch.bfloat16)
        src = src.pin_memory() if device.type == "cuda" else src  # (37, 129) host
        dst = torch.full(src.shape, float("nan"), dtype=src.dtype, device=device)
        read(dst, src)
        ok = bool(torch.equal(dst.cpu(), src.cpu()))
        # ... and the other way: device rows stored straight into a pinned host buffer
        back = torch.full(src.shape, float("nan"), dtype=src.dtype, pin_memory=device.type == "cuda")
        fresh = torch.randn(src.shape, generator=gen).to(torch.bfloat16).to(device)
        read(back, fresh)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        ok = ok and bool(torch.equal(back, fresh.cpu()))
    except Exception as exc:  # noqa: BLE001 - a kernel that fails to build or launch: copy instead
        if device.type == "cuda":
            try:  # ... unless it broke the device for the whole process (a fault inside the kernel)
                torch.cuda.synchronize(device)
            except Exception:  # noqa: BLE001
                raise SimcacheError(f"the host executor's result reader faulted on {device} in its "
                                    f"self-check ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); "
                                    f"CUDA cannot continue in this process") from None
        return None
    return read if ok else None


@dataclass
class Job:
    """One CPU expert of a group: its host weights row (W,), routed token rows (T,) on the
    device and gate weights (T, 1) on the device."""

    weights: torch.Tensor
    idx: torch.Tensor
    gate: torch.Tensor


@dataclass
class Ticket:
    """A group's CPU work in flight: its future and, once done, each expert's seconds (its
    host FFN and, with upload ``copy``, the sending of its result; the first expert's also the
    group's copy down, the last's the wait for the last copy up: they sum to the path; with
    ``read`` the results come up on the compute stream after the path), its host FFN alone, the
    seconds the worker waited for the GPU to gather the tokens, and the whole CPU path's
    seconds from then on."""

    future: Future
    jobs: list
    expert_s: list = field(default_factory=list)
    ffn_s: list = field(default_factory=list)
    path_s: float = 0.0
    wait_s: float = 0.0


class HostExecutor:
    """Computes CPU-assigned experts on the host, one group at a time, beside the GPU.

    Parameters
    ----------
    hidden, ffn_size : int
        Expert shapes.
    device : torch.device
        Where activations and outputs live (``cuda:N``, or ``cpu`` in tests).
    threads : int, optional
        torch threads on the host (the probe's choice); default every core.

    On CUDA the results come up by :func:`checked_reader`'s kernel where it passes
    (``upload == "read"``); otherwise by copies on the executor's stream (``"copy"``).
    """

    def __init__(self, hidden: int, ffn_size: int, device: torch.device, threads: int | None = None,
                 max_tokens: int = 4096, dtype: torch.dtype = torch.bfloat16):
        self.hidden, self.ffn_size, self.dev = hidden, ffn_size, device
        self.threads = set_host_threads(threads)
        self.cpu_model = cpu_model()
        self.max_rows = int(max_tokens)
        self.cuda = device.type == "cuda"
        # the worker sets its own thread count: OpenMP's and MKL's are per calling thread, so
        # the issuing thread's setting does not reach a thread the pool creates
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="simcache-host",
                                        initializer=set_host_threads, initargs=(self.threads,))
        self.worker_threads = self._pool.submit(torch.get_num_threads).result()  # (as the worker sees it)
        self._stream = torch.cuda.Stream(device) if self.cuda else None
        pin = self.cuda
        self._down = torch.empty((max_tokens, hidden), dtype=dtype, pin_memory=pin)  # (n, H) host
        self._up = torch.empty((max_tokens, hidden), dtype=dtype, pin_memory=pin)  # (n, H) host
        self._dev_out = torch.empty((max_tokens, hidden), dtype=dtype, device=device)  # (n, H)
        self._consumed = None  # event: the compute stream has read the last results
        self._open = False
        self._reader = checked_reader(device) if self.cuda else None
        self.upload = "read" if self._reader is not None else "copy"

    def submit(self, x: torch.Tensor, jobs: list[Job]) -> Ticket | None:
        """Start a group's CPU experts on x (n, H); returns a ticket for :meth:`finish`, or
        None when the group has no CPU work. Call from the thread that issues GPU work: the
        gather of each expert's tokens is queued on the current stream before the worker
        copies them down."""
        if not jobs:
            return None
        if self._open:
            raise SimcacheError("HostExecutor: finish a group's CPU work before submitting the next")
        self._open = True
        total = sum(int(j.idx.numel()) for j in jobs)
        if total > self._down.shape[0]:
            raise SimcacheError(f"a group sends {total} token rows to the CPU, more than the "
                                f"{self._down.shape[0]} the host buffers hold")
        # gather every CPU expert's token rows into one contiguous block on the device
        rows = torch.cat([j.idx for j in jobs]) if len(jobs) > 1 else jobs[0].idx  # (sum T,)
        picked = x.index_select(0, rows)  # (sum T, H)
        mapped = self._reader is not None
        if mapped:  # the GPU's own threads store the rows into the pinned host buffer: no copy
            # engine, so the activations never queue behind the group's weight copies
            self._reader(self._down[:total], picked)
        gathered = None
        if self.cuda:
            if not mapped:
                picked.record_stream(self._stream)  # read on the executor's stream
            gathered = torch.cuda.Event()
            gathered.record()
        ticket = Ticket(None, jobs)
        ticket.future = self._pool.submit(self._work, None if mapped else picked, total, gathered, ticket,
                                          time.perf_counter())
        return ticket

    def _work(self, picked, n, gathered, ticket, t0):
        out = self._dev_out[:n]  # (sum T, H) on the device
        down, up = self._down[:n], self._up[:n]  # (sum T, H) host
        if self.cuda:
            gathered.synchronize()  # the compute stream reached this group: the CPU path starts
            if self._consumed is not None:  # the previous group's results were read
                if self._reader is not None:
                    # (from the pinned buffer this group rewrites; the gather above already
                    # follows that read on the compute stream: this keeps it so if a caller
                    # ever finishes and submits on different streams)
                    self._consumed.synchronize()
                else:
                    self._stream.wait_event(self._consumed)
        ticket.wait_s = time.perf_counter() - t0
        t0 += ticket.wait_s
        # every CPU expert's tokens down in one copy (unless submit's kernel stored them
        # already); with upload "copy", each result goes back up as soon as it is computed,
        # with no wait, so the round trip costs one copy's latency each way per group, not per
        # expert; with "read", finish() reads them
        send = self._reader is None
        if picked is not None and self.cuda:
            with torch.cuda.stream(self._stream):
                down.copy_(picked, non_blocking=True)  # device -> host
            self._stream.synchronize()
        elif picked is not None:
            down.copy_(picked)
        lo, e0 = 0, t0
        for job in ticket.jobs:
            t = int(job.idx.numel())
            f0 = time.perf_counter()
            up[lo:lo + t].copy_(ffn(down[lo:lo + t], job.weights, self.hidden, self.ffn_size))  # (T, H) host
            ticket.ffn_s.append(time.perf_counter() - f0)
            if send and self.cuda:
                with torch.cuda.stream(self._stream):
                    out[lo:lo + t].copy_(up[lo:lo + t], non_blocking=True)  # host -> device
            elif send:
                out[lo:lo + t].copy_(up[lo:lo + t])
            lo += t
            if lo == n and send and self.cuda:
                self._stream.synchronize()  # the last result is up
            e1 = time.perf_counter()
            ticket.expert_s.append(e1 - e0)  # (the first includes the copy down, the last the final copy up)
            e0 = e1
        ticket.path_s = time.perf_counter() - t0
        return out

    def finish(self, ticket: Ticket | None, out: torch.Tensor) -> None:
        """Wait for a group's CPU results and add them into out (n, H) on the current stream:
        out[idx] += gate x FFN(x[idx]) for every CPU expert."""
        if ticket is None:
            return
        y = ticket.future.result()  # (sum T, H) on the device
        self._open = False
        if self._reader is not None:
            self._reader(y, self._up[: y.shape[0]])  # pinned host -> device, read by the GPU
        lo = 0
        for job in ticket.jobs:
            t = int(job.idx.numel())
            out.index_add_(0, job.idx, y[lo:lo + t] * job.gate)
            lo += t
        if self.cuda:
            self._consumed = torch.cuda.Event()
            self._consumed.record()

    def run(self, fn):
        """fn() on the worker thread (its torch thread count, where the experts are computed);
        its result. For timing the host as the executor sees it."""
        if self._open:
            raise SimcacheError("HostExecutor: finish a group's CPU work before running anything else on it")
        return self._pool.submit(fn).result()

    def close(self):
        self._pool.shutdown(wait=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
