#!/usr/bin/env bash
# Replay at device speed (docs/design.md §15), on one GPU, from the repository root, in about 8 minutes:
#   1. probe the GPU for every preset replayed (copy bandwidth, the eager path's per-expert FFN
#      table, the fast path's grouped FFN table);
#   2. replay lru and belady-bypass, two capacities, batch 1 and 16, with the eager and the fast
#      issue path, for DeepSeek-V2-Lite on traces/flame-moe-290m.parquet (64 experts, top-6),
#      qwen3-30b-a3b and olmoe on matching `simcache synth` traces (generated here), and
#      Mixtral-8x7B on traces/trained-mixtral-8e.parquet (a layer subset);
#   3. check outputs against all-resident runs (--verify), eager and fast, once per preset;
#   4. check the results (recipes/replay_report.py --check) and pack them.
# It writes two files to $OUT: log.txt (all it printed) and replay-fast.tar.gz (the folder fast/:
# calibrations, replay and verify JSON, the synthetic traces, report.md); exit status 1 if a step
# failed, a file is missing or an outputs check failed.
#
#   OUT=/tmp/out bash recipes/gpu_replay_fast.sh        # then, here:
#   tar -xzf $OUT/replay-fast.tar.gz -C docs/replay-data && python recipes/replay_report.py docs/replay-data/fast
#
# STEPS (default 32, 2 of them untimed warm-up) and PRESETS (default: all four) shorten a run or
# split it over two calls (each call's report then covers the presets it ran).
set -uo pipefail
export PYTHONPATH=${PYTHONPATH:-.} PYTHONUNBUFFERED=1
OUT=${OUT:?set OUT}
STEPS=${STEPS:-32}
PRESETS=${PRESETS:-"deepseek-v2-lite qwen3-30b-a3b olmoe mixtral-8x7b"}
R=${WORK:-/tmp/replay-fast}/fast   # everything lands here, packed into $OUT at the end
rm -rf "$R"; mkdir -p "$R"
exec > >(tee "$OUT/log.txt") 2>&1
S="python3 -m simcache"
fail=0
pack() { tar -czf "$OUT/replay-fast.tar.gz" -C "$(dirname "$R")" fast; }  # after each preset: a cut-off run keeps what it has
step() { echo "+ $*" >&2; local t0=$SECONDS; "$@" || { echo "FAILED ($?): $*" >&2; fail=1; }; echo "  ($((SECONDS - t0)) s)" >&2; }
grep -E 'MemTotal|MemAvailable' /proc/meminfo
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c 'import torch; print("torch", torch.__version__, torch.cuda.get_device_name(0))'
step python3 recipes/gpu_fast_check.py   # the grouped SwiGLU against the eager one, on this GPU

# traces: preset -> trace, capacities, layers (a subset where host memory would not hold all)
step $S synth "$R/synth-qwen3-128e.parquet" --experts 128 --top-k 8 --layers 8 --requests 32 --length 64 --seed 1 --force
step $S synth "$R/synth-olmoe-64e.parquet" --experts 64 --top-k 8 --layers 8 --requests 32 --length 64 --seed 2 --force
declare -A TRACE=([deepseek-v2-lite]=traces/flame-moe-290m.parquet [qwen3-30b-a3b]=$R/synth-qwen3-128e.parquet
                  [olmoe]=$R/synth-olmoe-64e.parquet [mixtral-8x7b]=traces/trained-mixtral-8e.parquet)
declare -A CAPS=([deepseek-v2-lite]=16,32 [qwen3-30b-a3b]=32,64 [olmoe]=16,32 [mixtral-8x7b]=2,4)
declare -A LAYERS=([deepseek-v2-lite]=0-7 [qwen3-30b-a3b]=0-7 [olmoe]=0-7 [mixtral-8x7b]=0-1)

for p in $PRESETS; do
  step $S probe --gpu 0 --preset "$p" --out "$R/calib-$p.json"
done
for p in $PRESETS; do
  common=("${TRACE[$p]}" --gpu 0 --preset "$p" --calibration "$R/calib-$p.json" --layers "${LAYERS[$p]}")
  for issue in eager fast; do
    step $S replay "${common[@]}" --issue $issue --policy lru,belady-bypass --capacity "${CAPS[$p]}" \
        --batch 1,16 --steps "$STEPS" --out "$R/replay-$p-$issue.json"
    step $S replay "${common[@]}" --issue $issue --policy belady-bypass --capacity "${CAPS[$p]%%,*}" \
        --batch 8 --steps 12 --verify --out "$R/verify-$p-$issue.json"
  done
  pack
done
python3 recipes/replay_report.py "$R" --check > "$R/report.md" || { echo "FAILED: the report's checks" >&2; fail=1; }
cat "$R/report.md"
pack
ls -la "$OUT"
sleep 1   # let tee finish log.txt
exit $fail
