"""The cost model (DESIGN §5): seconds for expert loads over PCIe and for expert FFNs.

Per (step, layer): transfer = loads x copy time of one expert; compute = sum over demanded
experts of the FFN time (on the GPU) for the tokens routed to it. With a copy stream
(``overlap``) a (step, layer) takes max(compute, transfer + the last loaded expert's compute),
else compute + transfer. Only expert work on the GPU is modelled: attention, the rest of the
model and the host's time to issue the work are not, so the reported time per token is the
*expert* time of a runtime that keeps the GPU fed (docs/replay.md shows where a Python harness
does not).

A :class:`Calibration` holds the measured tables; ``simcache probe`` writes one as JSON on a
GPU, and the built-in default carries the H200 figures of DESIGN §5.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from simcache._files import atomic_write_text, check_input
from simcache.errors import SimcacheError

CALIBRATION_VERSION = 1
MIB = 1 << 20
MIXTRAL_EXPERT_BYTES = 3 * 4096 * 14336 * 2  # bf16 w1, w2, w3 of one Mixtral-8x7B expert


@dataclass(frozen=True)
class Calibration:
    """Measured transfer and compute tables of one GPU.

    Attributes
    ----------
    device : str
        The GPU the numbers come from.
    copy_bytes, copy_gbps : list
        Pinned host-to-device bandwidth (GB/s, 1e9 bytes) by copy size; interpolated in
        log(size), clamped at both ends.
    ffn_expert_bytes : int
        Size of the expert the FFN table was measured on.
    ffn_tokens, ffn_seconds : list
        SwiGLU expert FFN time by token count; interpolated linearly, extrapolated along the
        last segment, and scaled by expert size for other experts (the FFN streams its weights,
        so its time follows their bytes).
    overlap : bool
        Whether copies run on a side stream concurrently with compute.
    source : str
        Where the numbers come from.
    """

    device: str
    copy_bytes: list = field(default_factory=list)
    copy_gbps: list = field(default_factory=list)
    ffn_expert_bytes: int = MIXTRAL_EXPERT_BYTES
    ffn_tokens: list = field(default_factory=list)
    ffn_seconds: list = field(default_factory=list)
    overlap: bool = True
    source: str = ""
    extra: dict = field(default_factory=dict)

    def copy_seconds(self, nbytes: float) -> float:
        """Seconds to copy ``nbytes`` from pinned host memory to the GPU."""
        if nbytes <= 0:
            return 0.0
        x = np.log(np.asarray(self.copy_bytes, float))
        gbps = float(np.interp(math.log(nbytes), x, np.asarray(self.copy_gbps, float)))
        return nbytes / (gbps * 1e9)

    def ffn_seconds_for(self, tokens, expert_bytes: int) -> np.ndarray:
        """Seconds of one expert's FFN on ``tokens`` tokens (array-like)."""
        t = np.asarray(tokens, float)
        xs = np.asarray(self.ffn_tokens, float)
        ys = np.asarray(self.ffn_seconds, float)
        out = np.interp(t, xs, ys)
        if xs.size >= 2:
            slope = (ys[-1] - ys[-2]) / (xs[-1] - xs[-2])
            beyond = t > xs[-1]
            out[beyond] = ys[-1] + slope * (t[beyond] - xs[-1])
        out[t <= 0] = 0.0
        return out * (expert_bytes / self.ffn_expert_bytes)

    def to_json(self) -> str:
        return json.dumps({"calibration_version": CALIBRATION_VERSION, **asdict(self)}, indent=2)

    def save(self, path) -> Path:
        """Write atomically (temporary name, then rename)."""
        return atomic_write_text(path, self.to_json() + "\n")


def default_calibration() -> Calibration:
    """The H200 (PCIe 5.0 x16) reference figures of DESIGN §5."""
    return Calibration(
        device="NVIDIA H200 (DESIGN §5 reference figures)",
        copy_bytes=[1 * MIB, 16 * MIB, 1024 * MIB],
        copy_gbps=[35.0, 54.5, 55.0],
        ffn_expert_bytes=MIXTRAL_EXPERT_BYTES,
        ffn_tokens=[1, 128, 2048],
        ffn_seconds=[0.12e-3, 0.12e-3, 1.0e-3],
        overlap=True,
        source="built-in default (DESIGN §5)",
    )


def load_calibration(path) -> Calibration:
    """Read a calibration JSON written by ``simcache probe``."""
    path = check_input(path, "calibration file")
    try:
        data = json.loads(path.read_text())
    except ValueError:
        raise SimcacheError(f"calibration file is not valid JSON: {path}") from None
    if not isinstance(data, dict) or data.get("calibration_version") != CALIBRATION_VERSION:
        raise SimcacheError(f"{path} is not a simcache calibration (version {CALIBRATION_VERSION})")
    data.pop("calibration_version")
    try:
        cal = Calibration(**data)
    except TypeError as exc:
        raise SimcacheError(f"{path}: unexpected calibration fields ({exc})") from None
    if len(cal.copy_bytes) < 1 or len(cal.copy_bytes) != len(cal.copy_gbps):
        raise SimcacheError(f"{path}: copy_bytes and copy_gbps must be equal-length, non-empty")
    if len(cal.ffn_tokens) < 1 or len(cal.ffn_tokens) != len(cal.ffn_seconds):
        raise SimcacheError(f"{path}: ffn_tokens and ffn_seconds must be equal-length, non-empty")
    if min(cal.copy_gbps) <= 0 or min(cal.ffn_seconds) < 0:
        raise SimcacheError(f"{path}: bandwidths must be positive and times non-negative")
    return cal
