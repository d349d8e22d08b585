"""Expert weights on the host and the GPU, and the expert FFN.

Tensor dimensions used in shape comments:
    H  hidden size            F  expert FFN size        W = 3 * F * H  elements per expert
    N  experts stored         S  GPU slots              T  tokens routed to one expert
    Q  stored bytes or elements per expert (W, or W / 2 for int4)

Quantised experts (``--expert-dtype``) are stored, copied and held in GPU slots in their
quantised form and dequantised to the compute dtype just before their GEMMs (the timed FFN
includes the dequantisation). Both formats use one scale per tensor, a constant of the
weights' known spread, so one expert is still one contiguous buffer of exactly
``W x bits / 8`` bytes (real checkpoints add group scales: about 3 % more bytes for int4 with
groups of 128):

* ``fp8``: float8_e4m3fn, one byte per weight;
* ``int4``: two weights per byte (low nibble first), values -8..7 stored with an offset of 8.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from simcache.errors import SimcacheError
from simcache.replay import QUANTISED
from simcache.replay.presets import Preset

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
_FP8 = getattr(torch, "float8_e4m3fn", None)


def pick_device(gpu: int | None, device: str | None) -> torch.device:
    """``--gpu N`` -> cuda:N (checked); ``--device cpu`` -> the CPU (tiny shapes, tests)."""
    if gpu is not None and device not in (None, "cuda"):
        raise SimcacheError("give --gpu N or --device cpu, not both")
    if gpu is None and device in (None, "cpu"):
        return torch.device("cpu")
    index = 0 if gpu is None else int(gpu)
    if not torch.cuda.is_available():
        raise SimcacheError(f"--gpu {index}: no CUDA device is available here (use --device cpu to "
                            f"run the replay logic on the CPU)")
    count = torch.cuda.device_count()
    if index < 0 or index >= count:
        raise SimcacheError(f"--gpu {index}: no such GPU ({count} found)")
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def host_available_bytes() -> int:
    """MemAvailable from /proc/meminfo (bytes); a large number where it cannot be read."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62


def gpu_free_bytes(device: torch.device) -> int:
    if device.type != "cuda":
        return 1 << 62
    free, _ = torch.cuda.mem_get_info(device)
    return int(free)


def stored_format(expert_dtype: str | None, dtype: torch.dtype) -> tuple[torch.dtype, int]:
    """(dtype of a stored row, weights per stored element) of an expert format: ``None`` ->
    (the compute dtype, 1), ``fp8`` -> (float8_e4m3fn, 1), ``int4`` -> (uint8, 2)."""
    if expert_dtype is None:
        return dtype, 1
    if expert_dtype == "fp8":
        if _FP8 is None:
            raise SimcacheError(f"--expert-dtype fp8: this torch {torch.__version__} has no float8_e4m3fn")
        return _FP8, 1
    if expert_dtype == "int4":
        return torch.uint8, 2
    raise SimcacheError(f"--expert-dtype must be one of {', '.join(QUANTISED)}, got {expert_dtype!r}")


def quantise(w: torch.Tensor, expert_dtype: str | None, dtype: torch.dtype, hidden: int) -> torch.Tensor:
    """Weights w (..., W) float32 of spread hidden**-0.5 -> the stored form (..., Q)."""
    if expert_dtype is None:
        return w.to(dtype)
    unit = w * hidden ** 0.5  # (..., W), spread 1
    if expert_dtype == "fp8":
        return unit.to(_FP8)
    q = (unit * 2).round().clamp(-8, 7).to(torch.int16) + 8  # (..., W) in 0..15
    pairs = q.unflatten(-1, (-1, 2))  # (..., W/2, 2)
    return (pairs[..., 0] | (pairs[..., 1] << 4)).to(torch.uint8)  # (..., W/2)


def dequantise(q: torch.Tensor, expert_dtype: str | None, dtype: torch.dtype, hidden: int) -> torch.Tensor:
    """Stored rows (..., Q) -> weights (..., W) in the compute dtype (a view where unquantised)."""
    if expert_dtype is None:
        return q
    if expert_dtype == "fp8":
        return q.to(dtype) * hidden ** -0.5  # (..., W)
    nibbles = torch.stack((q & 15, q >> 4), dim=-1).flatten(-2)  # (..., W) in 0..15
    return (nibbles.to(dtype) - 8) * (0.5 * hidden ** -0.5)  # (..., W)


class ExpertStore:
    """Every (layer, expert) of the replayed layers as one row of one host buffer.

    On a GPU the buffer is pinned, so one load is one asynchronous copy of one contiguous
    row. Weights are deterministic random values (seeded per expert), generated on the device,
    quantised there if ``expert_dtype`` asks, and copied down once.
    """

    def __init__(self, preset: Preset, num_keys: int, dtype: torch.dtype, device: torch.device, seed: int = 0,
                 expert_dtype: str | None = None):
        self.preset = preset
        self.W = preset.expert_elements()
        self.dtype = dtype  # the compute dtype
        self.expert_dtype = expert_dtype
        stored, per = stored_format(expert_dtype, dtype)
        self.Q = self.W // per
        pin = device.type == "cuda"
        self.host = torch.empty((num_keys, self.Q), dtype=stored, pin_memory=pin)  # (N, Q)
        scale = preset.hidden ** -0.5
        for key in range(num_keys):
            gen = torch.Generator(device=device).manual_seed(seed * 1_000_003 + key)
            row = torch.randn(self.W, generator=gen, device=device, dtype=torch.float32)  # (W,)
            self.host[key].copy_(quantise(row * scale, expert_dtype, dtype, preset.hidden))
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    @property
    def expert_bytes(self) -> int:
        return self.Q * self.host.element_size()

    def weights(self, rows: torch.Tensor) -> torch.Tensor:
        """Stored rows (..., Q) on the device -> weights (..., W) in the compute dtype."""
        return dequantise(rows, self.expert_dtype, self.dtype, self.preset.hidden)


def ffn(x: torch.Tensor, w: torch.Tensor, hidden: int, ffn_size: int) -> torch.Tensor:
    """SwiGLU expert: x (T, H), w (W,) = [w1; w3; w2] -> (T, H)."""
    w13 = w[: 2 * ffn_size * hidden].view(2 * ffn_size, hidden)  # (2F, H)
    w2 = w[2 * ffn_size * hidden:].view(hidden, ffn_size)  # (H, F)
    gate, up = (x @ w13.t()).split(ffn_size, dim=-1)  # (T, F), (T, F)
    return (F.silu(gate) * up) @ w2.t()  # (T, H)


def apply_expert(out, x, idx, weight, w, hidden, ffn_size):
    """out[idx] += weight * FFN(x[idx]); out (n, H), idx (T,), weight (T, 1)."""
    y = ffn(x.index_select(0, idx), w, hidden, ffn_size)  # (T, H)
    out.index_add_(0, idx, y * weight)
