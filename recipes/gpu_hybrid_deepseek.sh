set -uo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1
S="python3 -m simcache"
date -u +%T
$S probe --gpu 0 --preset deepseek-v2-lite --cpu-threads 8,12,all --out "$OUT/calib-hybrid-deepseek-v2-lite.json" | tail -16
F="traces/flame-moe-290m.parquet --gpu 0 --preset deepseek-v2-lite --layers 0-7 --calibration $OUT/calib-hybrid-deepseek-v2-lite.json"
date -u +%T
timeout 100 $S replay $F --policy lru,static --miss load,cpu,auto --capacity 16 --batch 1,16 --split 0.5 --steps 20 --out "$OUT/hybrid-replay-deepseek-v2-lite.json" | cut -c1-220
date -u +%T
