"""On a GPU: the fast path's grouped SwiGLU against the eager per-expert one, and what the
empty groups of a weights window cost.

    python3 recipes/gpu_fast_check.py [preset]

Prints ||grouped - eager|| / ||eager|| (bf16 operands: expect 1e-3..1e-2 at most) on random
experts and tokens, and the device time of one grouped call on n experts laid out compactly
against the same call over a window of ``n + 200`` buffers (the extra ones empty).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from simcache.replay.experts import ffn  # noqa: E402
from simcache.replay.issue import grouped_ffn, split_weights  # noqa: E402
from simcache.replay.presets import PRESETS  # noqa: E402
from simcache.replay.probe import _graph_seconds  # noqa: E402

EMPTY = 200


def main(name="deepseek-v2-lite"):
    p = PRESETS[name]
    dev = torch.device("cuda", 0)
    H, F = p.hidden, p.ffn
    n, t = 6, 3
    w = (torch.randn((EMPTY + n, p.expert_elements()), device=dev) * H ** -0.5).to(torch.bfloat16)  # (B, W)
    x = torch.randn((n * t, H), device=dev).to(torch.bfloat16)  # (R, H)
    offs = (torch.arange(1, n + 1, device=dev) * t).to(torch.int32)  # (n,)
    w13, w2 = split_weights(w[EMPTY:], H, F)
    got = grouped_ffn(x, w13, w2, offs, F).float()
    ref = torch.cat([ffn(x[i * t:(i + 1) * t], w[EMPTY + i], H, F) for i in range(n)]).float()
    rel = float((got - ref).norm() / ref.norm())
    print(f"{name}: grouped vs eager SwiGLU, {n} experts x {t} tokens: relative error {rel:.2e}")
    assert rel < 2e-2, rel
    # a window where the n experts sit at its end, after EMPTY empty buffers
    wide13, wide2 = split_weights(w, H, F)
    wide_offs = torch.cat([torch.zeros(EMPTY, dtype=torch.int32, device=dev), offs])
    got_wide = grouped_ffn(x, wide13, wide2, wide_offs, F).float()
    print(f"window with {EMPTY} empty groups equals compact: {torch.equal(got_wide, got)}")
    compact = _graph_seconds(dev, lambda: [grouped_ffn(x, w13, w2, offs, F) for _ in range(8)], 8)
    wide = _graph_seconds(dev, lambda: [grouped_ffn(x, wide13, wide2, wide_offs, F) for _ in range(8)], 8)
    print(f"one grouped SwiGLU on {n} experts: {compact * 1e6:.1f} us compact, {wide * 1e6:.1f} us in a window "
          f"of {n + EMPTY} buffers ({torch.cuda.get_device_name(dev)})")


if __name__ == "__main__":
    main(*sys.argv[1:])
