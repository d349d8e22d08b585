#!/usr/bin/env bash
# On a GPU machine, from the repository root: probe the GPU for two presets, then replay LRU
# and markov (tau = 0.1) at two capacities, batch 1 and 16, for the Mixtral-8x7B bf16 preset
# (on the Mixtral-shaped sample trace) and the DeepSeek-V2-Lite preset (on the FLAME-MoE trace,
# same 64 experts, top-6), plus two short runs that check outputs against all-resident runs.
# The eager issue path (runs 2 and 3 of docs/replay.md); recipes/gpu_replay_fast.sh compares it
# with the fast one.
#   OUT=/tmp/out bash recipes/gpu_replay.sh
set -uo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:?set OUT}
grep -E 'MemTotal|MemAvailable' /proc/meminfo
S="python3 -m simcache"
$S probe --gpu 0 --preset mixtral-8x7b --out "$OUT/calib-h200-mixtral-8x7b.json"
$S probe --gpu 0 --preset deepseek-v2-lite --out "$OUT/calib-h200-deepseek-v2-lite.json" | tail -3
M="traces/trained-mixtral-8e.parquet --gpu 0 --issue eager --preset mixtral-8x7b --calibration $OUT/calib-h200-mixtral-8x7b.json"
F="traces/flame-moe-290m.parquet --gpu 0 --issue eager --preset deepseek-v2-lite --calibration $OUT/calib-h200-deepseek-v2-lite.json"
$S replay $M --policy lru,markov --capacity 2,4 --batch 1,16 --steps 80 --out "$OUT/replay-mixtral-8x7b.json"
$S replay $F --policy lru,markov --capacity 16,32 --batch 1,16 --steps 80 --out "$OUT/replay-deepseek-v2-lite.json"
$S replay $M --policy lru --capacity 2 --batch 4 --steps 12 --verify --out "$OUT/verify-mixtral-8x7b.json"
$S replay $F --policy markov --capacity 16 --batch 8 --steps 12 --verify --out "$OUT/verify-deepseek-v2-lite.json"
