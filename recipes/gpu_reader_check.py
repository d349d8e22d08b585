"""The host executor's result reader on a GPU (docs/hybrid.md, run 7): its self-check, then the
time to read 64 x 4096 bf16 (512 KiB) of pinned host memory into the device by the kernel,
the mean of 200 back to back after 3 warm-ups. Run from the repository root on a CUDA machine:

    PYTHONPATH=. python3 recipes/gpu_reader_check.py
"""
import time

import torch

from simcache.replay.cpu import checked_reader, zero_copy_reader

print("reader self-check:", checked_reader(torch.device("cuda:0")) is not None)
r = zero_copy_reader()
src = torch.randn(64, 4096).to(torch.bfloat16).pin_memory()
dst = torch.empty_like(src, device="cuda")
for _ in range(3):
    r(dst, src)
torch.cuda.synchronize()
t = time.perf_counter()
for _ in range(200):
    r(dst, src)
torch.cuda.synchronize()
print("read 64x4096 bf16: %.1f us" % ((time.perf_counter() - t) / 200 * 1e6))
print("equal:", torch.equal(dst.cpu(), src))
