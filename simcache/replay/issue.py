"""Carry a schedule out on the device: the eager path and the fast path.

Tensor dimensions used in shape comments (see also :mod:`simcache.replay.experts`):
    n  token rows of a step    k  top-k              B  GPU buffers (slots, then bypass ring)
    R  routes of a group (token, expert) pairs       G  experts of one grouped call

Both paths share the copies: each load is one copy of one contiguous pinned host row into one
GPU buffer, on a copy stream, between two events; a group's copies start once the previous
group's compute is done (they may overwrite what it reads).

* **eager** (``--issue eager``): one expert at a time, about seven PyTorch calls each (gather
  its tokens, three GEMMs with SwiGLU, weight, scatter-add); a loaded expert waits on its own
  copy's event, so hits and earlier loads compute while later copies run.
* **fast** (``--issue fast``, the default on CUDA): a constant number of calls per group,
  whatever its expert count: one gather of the group's token rows, then two grouped SwiGLU
  FFNs (``torch._grouped_mm`` over the weights tensor, the experts picked by offsets, no
  weight gather) — the hits at once, the loads after the group's last copy — and one
  scatter of the weighted outputs into (n, k) positions summed in float32. Quantised experts
  are gathered and dequantised to the compute dtype first (part of the timed FFN).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from simcache.errors import SimcacheError
from simcache.replay.experts import apply_expert
from simcache.replay.measure import Meter
from simcache.replay.schedule import Schedule, grouped_calls

def check_fast(device: torch.device, dtype: torch.dtype, capability: tuple[int, int] | None = None) -> None:
    """The fast path needs ``torch._grouped_mm``; on CUDA that is bfloat16 on compute
    capability 9.0 or newer (Hopper). One-line errors otherwise."""
    if not hasattr(torch, "_grouped_mm"):
        raise SimcacheError(f"--issue fast needs torch._grouped_mm (torch {torch.__version__} has none); "
                            f"use --issue eager")
    if device.type != "cuda":
        return
    if dtype != torch.bfloat16:
        raise SimcacheError(f"--issue fast on CUDA computes in bfloat16 (grouped GEMM), got --dtype "
                            f"{str(dtype).replace('torch.', '')}; use --dtype bfloat16 or --issue eager")
    cap = capability if capability is not None else torch.cuda.get_device_capability(device)
    if tuple(cap) < (9, 0):
        raise SimcacheError(f"--issue fast needs a GPU of compute capability 9.0 or newer for bfloat16 grouped "
                            f"GEMMs (this one is {cap[0]}.{cap[1]}); use --issue eager")


def split_weights(w: torch.Tensor, hidden: int, ffn_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Views of expert rows w (G, W) = [w1; w3; w2] as grouped-GEMM operands (no copy):
    (G, H, 2F) for x @ [w1; w3]^T and (G, F, H) for h @ w2^T."""
    fh = ffn_size * hidden
    w13 = w[:, : 2 * fh].unflatten(1, (2 * ffn_size, hidden)).transpose(1, 2)  # (G, H, 2F)
    w2 = w[:, 2 * fh:].unflatten(1, (hidden, ffn_size)).transpose(1, 2)  # (G, F, H)
    return w13, w2


def grouped_ffn(xs: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, offs: torch.Tensor,
                ffn_size: int) -> torch.Tensor:
    """SwiGLU of G experts on their rows: xs (R, H), rows of expert i ending at offs[i]
    (offs (G,) int32, non-decreasing, offs[-1] = R) -> (R, H)."""
    h = torch._grouped_mm(xs, w13, offs=offs)  # (R, 2F)
    a = F.silu(h[:, :ffn_size]) * h[:, ffn_size:]  # (R, F)
    return torch._grouped_mm(a, w2, offs=offs)  # (R, H)


def expert_part(acc: torch.Tensor, xs: torch.Tensor, dest: torch.Tensor, gate: torch.Tensor,
                w13: torch.Tensor, w2: torch.Tensor, offs: torch.Tensor, ffn_size: int) -> None:
    """One grouped call: acc[dest] = gate * SwiGLU(xs) with each expert on its rows.
    acc (n k, H) float32, xs (R, H), dest (R,), gate (R, 1) float32; see :func:`grouped_ffn`."""
    y = grouped_ffn(xs, w13, w2, offs, ffn_size)  # (R, H)
    acc.index_copy_(0, dest, y.float() * gate)


class _Copies:
    """The copy side, shared by both paths: one copy per load, events around it."""

    def __init__(self, sched: Schedule, weights: torch.Tensor, host: torch.Tensor | None, device: torch.device):
        self.sched, self.weights, self.host = sched, weights, host
        self.cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        self.current = torch.cuda.current_stream(device) if self.cuda else None
        self.load_id = np.cumsum(sched.is_load()) - 1  # (C,) ordinal of each load
        self.prev_done = None  # the previous group's last event on the compute stream
        self.ring_free: list = [None] * max(sched.ring, 1)

    def copy(self, c: int, meter: Meter, first: bool) -> None:
        s, j = self.sched, int(self.load_id[c])
        dst, src = self.weights[int(s.buffer[c])], self.host[int(s.store_row[c])]
        if not self.cuda:
            dst.copy_(src)
            return
        if first and self.prev_done is not None:
            self.stream.wait_event(self.prev_done)  # earlier computes may read what this overwrites
        r = s.ring_of(c)
        if r >= 0 and self.ring_free[r] is not None:
            self.stream.wait_event(self.ring_free[r])
        with torch.cuda.stream(self.stream):
            meter.copy_start(j)
            dst.copy_(src, non_blocking=True)
            meter.copy_done(j)

    def copy_group(self, loads: range, meter: Meter) -> None:
        """All of a group's loads, in order, under one switch to the copy stream (the fast
        path, whose bypass buffers are never reused inside a group)."""
        if not self.cuda:
            for c in loads:
                self.copy(c, meter, first=False)
            return
        s, weights, host = self.sched, self.weights, self.host
        with torch.cuda.stream(self.stream):
            if self.prev_done is not None:
                self.stream.wait_event(self.prev_done)  # earlier computes may read what this overwrites
            for c in loads:
                j = int(self.load_id[c])
                meter.copy_start(j)
                weights[int(s.buffer[c])].copy_(host[int(s.store_row[c])], non_blocking=True)
                meter.copy_done(j)

    def wait(self, g: int, c: int, meter: Meter) -> None:
        """The compute stream waits for load c's copy."""
        if self.cuda:
            j = int(self.load_id[c])
            meter.wait_before(g, j)
            self.current.wait_event(meter.l_done[j])
            meter.wait_after(j)


class EagerIssue:
    """One expert at a time (the harness before the fast path; kept for comparison)."""

    def __init__(self, sched: Schedule, weights: torch.Tensor, host, store, x: torch.Tensor, device):
        self.sched, self.store, self.x = sched, store, x
        self.copies = _Copies(sched, weights, host, device)
        self.weights = weights
        p = store.preset
        self.hidden, self.ffn = p.hidden, p.ffn
        self.tok = torch.from_numpy(sched.route_token).to(device)  # (R,)
        self.gate = torch.from_numpy(sched.route_weight).to(device).to(x.dtype).unsqueeze(1)  # (R, 1)
        self.frees = [torch.cuda.Event() for _ in range(sched.ring)] if device.type == "cuda" else []

    def group(self, g: int, meter: Meter) -> torch.Tensor:
        s, cp = self.sched, self.copies
        meter.group_start(g)
        x = self.x[: int(s.rows[g])]  # (n, H)
        out = torch.zeros_like(x)  # (n, H)
        loads = s.loads(g)
        for c in range(s.compute_ptr[g], loads.start):
            self._compute(out, x, c)
        pending: list[int] = []
        for c in loads:
            r = s.ring_of(c)
            while r >= 0 and any(s.ring_of(p) == r for p in pending):
                self._compute_loaded(out, x, g, pending.pop(0), meter)  # before its buffer is overwritten
            cp.copy(c, meter, first=c == loads.start)
            pending.append(c)
        for c in pending:
            self._compute_loaded(out, x, g, c, meter)
        meter.group_done(g)
        if cp.cuda:
            cp.prev_done = meter.g_done[g]
        return out

    def _compute(self, out, x, c):
        s = self.sched
        r = s.routes(c)
        w = self.store.weights(self.weights[int(s.buffer[c])])  # (W,)
        apply_expert(out, x, self.tok[r], self.gate[r], w, self.hidden, self.ffn)

    def _compute_loaded(self, out, x, g, c, meter):
        self.copies.wait(g, c, meter)
        self._compute(out, x, c)
        r = self.sched.ring_of(c)
        if r >= 0 and self.frees:
            self.frees[r].record()
            self.copies.ring_free[r] = self.frees[r]


class FastIssue:
    """A constant number of host calls per group (see the module docstring)."""

    def __init__(self, sched: Schedule, weights: torch.Tensor, host, store, x: torch.Tensor, device):
        self.sched, self.store, self.x, self.weights = sched, store, x, weights
        self.copies = _Copies(sched, weights, host, device)
        p = store.preset
        self.hidden, self.ffn, self.k = p.hidden, p.ffn, sched.top_k
        self.quantised = store.expert_dtype is not None
        if not self.quantised:
            self.w13, self.w2 = split_weights(weights, p.hidden, p.ffn)  # (B, H, 2F), (B, F, H)
        calls = grouped_calls(sched, compact=self.quantised)
        # host-side ints, read without numpy scalars while issuing
        self.route_ptr, self.offs_ptr = calls.route_ptr.tolist(), calls.offs_ptr.tolist()
        self.win_lo, self.win_hi = calls.win_lo.tolist(), calls.win_hi.tolist()
        up = (lambda a: torch.from_numpy(a).to(device))
        self.tok = up(calls.token)  # (R,) token row of each route
        self.dest = up(calls.dest)  # (R,) token * k + top-k position
        self.gate = up(calls.weight).unsqueeze(1)  # (R, 1)
        self.offs = up(calls.offs)  # per call: cumulative routes per expert
        self.bufs = up(calls.buffers)  # per compact call: its buffers

    def group(self, g: int, meter: Meter) -> torch.Tensor:
        s, cp = self.sched, self.copies
        meter.group_start(g)
        n = int(s.rows[g])
        x = self.x[:n]  # (n, H)
        lo, hi = self.route_ptr[2 * g], self.route_ptr[2 * g + 2]
        xs = x.index_select(0, self.tok[lo:hi])  # (R, H) the group's rows, hits then loads
        acc = torch.zeros((n * self.k, self.hidden), dtype=torch.float32, device=x.device)  # (n k, H)
        loads = s.loads(g)
        if loads:
            cp.copy_group(loads, meter)
        self._call(acc, xs, 2 * g, lo)  # the hits, while the copies run
        if loads:
            cp.wait(g, loads.stop - 1, meter)  # copies land in order: the last one covers all
        self._call(acc, xs, 2 * g + 1, lo)  # the loaded experts
        out = acc.view(n, self.k, self.hidden).sum(1).to(x.dtype)  # (n, H)
        meter.group_done(g)
        if cp.cuda:
            cp.prev_done = meter.g_done[g]
        return out

    def _call(self, acc, xs, p: int, base: int) -> None:
        """Grouped call p on the group's gathered rows xs (its first route is ``base``)."""
        r0, r1 = self.route_ptr[p], self.route_ptr[p + 1]
        if r0 == r1:
            return
        o0, o1 = self.offs_ptr[p], self.offs_ptr[p + 1]
        if self.quantised:
            w = self.store.weights(self.weights.index_select(0, self.bufs[o0:o1]))  # (G, W)
            w13, w2 = split_weights(w, self.hidden, self.ffn)
        else:
            w13, w2 = self.w13[self.win_lo[p]: self.win_hi[p]], self.w2[self.win_lo[p]: self.win_hi[p]]
        expert_part(acc, xs[r0 - base: r1 - base], self.dest[r0:r1], self.gate[r0:r1], w13, w2, self.offs[o0:o1],
                    self.ffn)


ISSUERS = {"eager": EagerIssue, "fast": FastIssue}  # keys: simcache.replay.ISSUE_PATHS
