#!/usr/bin/env bash
# On one H200, from the repository root: prefetch on the copy-engine timeline, measured.
# Probe the Mixtral-8x7B preset, then replay lru at capacities 2 and 4 (of 8 experts), batch 1
# and 16, with --prefetch none,oracle,<third> on the Mixtral-shaped sample trace (4 MoE
# layers; all four replayed, 11 GiB of pinned host memory), 24 steps each; JSON to $OUT.
# <third> is lookahead on traces/trained-mixtral-8e-lookahead.parquet (re-captured with
# capture --lookahead by recipes/gpu_capture_lookahead.sh) when present, else markov on the
# shipped trace (its prior fitted on the other half of the requests is not
# used here: replay scores all requests, so markov learns online only). The eager issue path
# and its calibration (--issue eager): the timeline prices experts one by one; then
# --verify with prefetch at capacity 2, batch 4. Budget: ~7 minutes.
#   OUT=/tmp/out bash recipes/gpu_prefetch.sh
set -uo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:?set OUT}
S="python3 -m simcache"
T=traces/trained-mixtral-8e-lookahead.parquet  # from recipes/gpu_capture_lookahead.sh, if it has run
[ -f "$T" ] || T=traces/trained-mixtral-8e.parquet
THIRD=$(python3 -c "import simcache; t = simcache.read_trace('$T'); print('lookahead' if getattr(t, 'lookahead', None) is not None else 'markov')")
echo "third predictor: $THIRD" | tee "$OUT/prefetch-log.txt"
$S probe --gpu 0 --preset mixtral-8x7b --issue eager --out "$OUT/calib-h200-mixtral-8x7b.json" | tail -3
CAL="--calibration $OUT/calib-h200-mixtral-8x7b.json"
EB=$(python3 -c "from simcache.replay.presets import PRESETS; print(PRESETS['mixtral-8x7b'].expert_bytes())")
# the simulator's prediction for the same cells (whole trace), always
for B in 1 16; do
  $S simulate $T --expert-bytes "$EB" $CAL --capacity 2,4 --batch $B --prefetch none,oracle,$THIRD \
     --prefetch-width 2 --json > "$OUT/predicted-b$B.json"
done
# the measured timeline: the simulator's prefetches issued on the copy stream (docs/prefetch.md
# "Replay"), one predictor per call so that a failure leaves the others' JSON
for P in none oracle $THIRD; do
  timeout 100 $S replay $T --gpu 0 --preset mixtral-8x7b $CAL --policy lru --capacity 2,4 --batch 1,16 \
     --issue eager --steps 24 --prefetch $P --prefetch-width 2 --out "$OUT/replay-prefetch-$P.json" 2>&1 | tail -12 \
     | tee -a "$OUT/prefetch-log.txt"
done
# outputs through the prefetch slots and buffers equal an all-resident run's (bitwise)
for P in oracle $THIRD; do
  timeout 60 $S replay $T --gpu 0 --preset mixtral-8x7b $CAL --policy lru --capacity 2 --batch 4 --issue eager \
     --steps 12 --prefetch $P --prefetch-width 2 --verify --out "$OUT/verify-prefetch-$P.json" 2>&1 | tail -4 \
     | tee -a "$OUT/prefetch-log.txt"
done
