"""The host executor's mapped-memory kernel on a GPU (docs/hybrid.md, runs 7 and 9): its
self-check (both ways), then the time to read 64 x 4096 bf16 (512 KiB) of pinned host memory
into the device, and to store as much from the device into pinned host memory (the executor's
activations going down), each the mean of 200 back to back after 3 warm-ups. Run from the
repository root on a CUDA machine:

    PYTHONPATH=. python3 recipes/gpu_reader_check.py
"""
import time

import torch

from simcache.replay.cpu import checked_reader, zero_copy_reader


def timed(fn):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(200):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / 200 * 1e6


print("self-check (host -> device and device -> host):", checked_reader(torch.device("cuda:0")) is not None)
r = zero_copy_reader()
host = torch.randn(64, 4096).to(torch.bfloat16).pin_memory()
dev = torch.empty_like(host, device="cuda")
print("read 64x4096 bf16 host -> device: %.1f us" % timed(lambda: r(dev, host)))
print("equal:", torch.equal(dev.cpu(), host))
dev = torch.randn(64, 4096, device="cuda").to(torch.bfloat16)
back = torch.full(host.shape, float("nan"), dtype=host.dtype, pin_memory=True)  # (full_like drops the pinning)
print("store 64x4096 bf16 device -> host: %.1f us" % timed(lambda: r(back, dev)))
print("equal:", torch.equal(back, dev.cpu()))
copy = torch.full(host.shape, float("nan"), dtype=host.dtype, pin_memory=True)
print("for comparison, copy_ device -> host (non_blocking, copy engine): %.1f us"
      % timed(lambda: copy.copy_(dev, non_blocking=True)))
