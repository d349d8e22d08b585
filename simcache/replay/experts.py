"""Expert weights on the host and the GPU, and the expert FFN.

Tensor dimensions used in shape comments:
    H  hidden size            F  expert FFN size        W = 3 * F * H  elements per expert
    N  experts stored         S  GPU slots              T  tokens routed to one expert
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from simcache.replay.presets import Preset
from simcache.errors import SimcacheError

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


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


class ExpertStore:
    """Every (layer, expert) of the replayed layers as one row of one host buffer.

    On a GPU the buffer is pinned, so one load is one asynchronous copy of one contiguous
    row. Weights are deterministic random values (seeded per expert), generated on the device
    and copied down once.
    """

    def __init__(self, preset: Preset, num_keys: int, dtype: torch.dtype, device: torch.device, seed: int = 0):
        self.preset = preset
        self.W = preset.expert_elements()
        self.dtype = dtype
        pin = device.type == "cuda"
        self.host = torch.empty((num_keys, self.W), dtype=dtype, pin_memory=pin)  # (N, W)
        scale = preset.hidden ** -0.5
        for key in range(num_keys):
            gen = torch.Generator(device=device).manual_seed(seed * 1_000_003 + key)
            row = torch.randn(self.W, generator=gen, device=device, dtype=torch.float32)  # (W,)
            self.host[key].copy_((row * scale).to(dtype))
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    @property
    def expert_bytes(self) -> int:
        return self.W * self.host.element_size()


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
