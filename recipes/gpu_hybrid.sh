#!/usr/bin/env bash
# Hybrid execution on one GPU machine (docs/design.md §11), from the repository root: probe the GPU and
# its host CPU, then replay lru and static with --miss load,cpu,auto at two capacities, batch 1
# and 16: the Mixtral-8x7B bf16 preset on the Mixtral-shaped sample trace (layers 0-3: 4 x 8
# experts x 336 MiB = 11 GiB of pinned host memory), the headline (2 of 8 experts, batch 1: every
# --miss mode for belady-bypass, lru and static), an output check, and the DeepSeek-V2-Lite preset
# on the FLAME-MoE trace (64 experts, top-6). static's hot set comes from the other half of the
# requests (--split 0.5), never from the scored ones. Results as JSON under $OUT.
#   OUT=/tmp/out bash recipes/gpu_hybrid.sh              # everything, ~8 minutes on one H200
#   PARTS=mixtral OUT=/tmp/out bash recipes/gpu_hybrid.sh  # probe + Mixtral grid + headline, ~6 minutes
#   PARTS=grid OUT=/tmp/out bash recipes/gpu_hybrid.sh     # probe + Mixtral grid, ~4 minutes
#   THREADS=12,all ...   the probe's thread counts (default 8,12,all)
#   CPU_REFRESH=2 ...    replay with --cpu-refresh 2: each hybrid run re-times the host FFN first (run 9)
set -uo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:?set OUT}
PARTS=${PARTS:-all}
THREADS=${THREADS:-8,12,all}
REFRESH="--cpu-refresh ${CPU_REFRESH:-0}"
grep -m1 'model name' /proc/cpuinfo; nproc
echo "SMT siblings of cpu0: $(cat /sys/devices/system/cpu/cpu0/topology/thread_siblings_list 2>/dev/null)"
# the time, and the host's steal time so far (USER_HZ ticks taken by the hypervisor: other tenants)
stamp() { echo "$(date -u +%T) steal $(awk '/^cpu /{print $9}' /proc/stat)"; }
S="python3 -m simcache"
stamp
$S probe --gpu 0 --preset mixtral-8x7b --cpu-threads $THREADS --out "$OUT/calib-hybrid-mixtral-8x7b.json" | tail -16
M="traces/trained-mixtral-8e.parquet --gpu 0 --preset mixtral-8x7b --layers 0-3 --calibration $OUT/calib-hybrid-mixtral-8x7b.json"
stamp
$S replay $M --policy lru,static --miss load,cpu,auto --capacity 2,4 --batch 1,16 --split 0.5 --steps 30 $REFRESH \
  --out "$OUT/hybrid-replay-mixtral-8x7b.json" | cut -c1-260
stamp
[ "$PARTS" = grid ] && exit 0
# the headline: 2 of 8 experts per layer, batch 1 -- the best copy-only schedule (belady-bypass
# included) against the best hybrid one
$S replay $M --policy belady-bypass,lru,static --miss load,cpu,auto,auto-cputime --capacity 2 --batch 1 \
  --split 0.5 --steps 60 $REFRESH --out "$OUT/hybrid-headline-mixtral-8x7b.json" | cut -c1-260
stamp
[ "$PARTS" = mixtral ] && exit 0
# outputs with CPU-computed experts against an all-resident GPU run (relative norm error)
$S replay $M --policy static --miss cpu --capacity 2 --batch 4 --split 0.5 --steps 12 --verify \
  --out "$OUT/hybrid-verify-mixtral-8x7b.json" | cut -c1-260
$S probe --gpu 0 --preset deepseek-v2-lite --cpu-threads $THREADS --out "$OUT/calib-hybrid-deepseek-v2-lite.json" | tail -16
F="traces/flame-moe-290m.parquet --gpu 0 --preset deepseek-v2-lite --layers 0-7 --calibration $OUT/calib-hybrid-deepseek-v2-lite.json"
$S replay $F --policy lru,static --miss load,cpu,auto --capacity 16,32 --batch 1,16 --split 0.5 --steps 30 \
  --out "$OUT/hybrid-replay-deepseek-v2-lite.json" | cut -c1-260
stamp
