# DeepSeek-V2-Lite on one GPU machine, from the repository root: probe, then replay lru and static
# with --miss load,cpu,auto at capacities 16 and 32 (of 64), batch 1 and 16, on the FLAME-MoE
# trace (64 experts, top-6; layers 0-7). ~3 minutes on one H200. Results as JSON under $OUT.
#   OUT=/tmp/out bash recipes/gpu_hybrid_deepseek.sh
set -uo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:?set OUT}
S="python3 -m simcache"
stamp() { echo "$(date -u +%T) steal $(awk '/^cpu /{print $9}' /proc/stat)"; }
stamp
$S probe --gpu 0 --preset deepseek-v2-lite --cpu-threads 8,12,all --out "$OUT/calib-hybrid-deepseek-v2-lite.json" | tail -16
F="traces/flame-moe-290m.parquet --gpu 0 --preset deepseek-v2-lite --layers 0-7 --calibration $OUT/calib-hybrid-deepseek-v2-lite.json"
stamp
timeout 200 $S replay $F --policy lru,static --miss load,cpu,auto --capacity 16,32 --batch 1,16 --split 0.5 --steps 20 --out "$OUT/hybrid-replay-deepseek-v2-lite.json" | cut -c1-260
stamp
