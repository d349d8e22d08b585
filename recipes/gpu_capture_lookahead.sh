#!/usr/bin/env bash
# On a GPU machine, from the repository root, with the held-out corpus in /tmp/corpus (as
# recipes/gpu_train_and_capture.sh leaves it): capture the shipped sample checkpoints again
# with --lookahead, into new files beside the shipped traces (the goldens' traces stay as they
# are). Not run yet: the shipped traces do not carry the lookahead column.
#   bash recipes/gpu_capture_lookahead.sh
set -euo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1
for pair in mixtral:trained-mixtral-8e olmoe:trained-olmoe-32e; do
  arch=${pair%%:*}; name=${pair#*:}
  args=()
  for d in code english poetry latex german french; do args+=(--text "$d=/tmp/corpus/$d.heldout.txt"); done
  python3 cli.py capture --model models/$arch "${args[@]}" --device cuda --dtype bfloat16 \
      --max-length 512 --batch-size 32 --lookahead --resume --out "traces/$name-lookahead.parquet"
done
