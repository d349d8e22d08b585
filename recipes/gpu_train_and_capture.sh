#!/usr/bin/env bash
# On a GPU machine, from the repository root, with .carry/ holding the corpus (xz) and the
# tokenizer (recipes/corpus.py, recipes/tokenizer.py): train both sample models and capture
# their routing on held-out text of every domain with `simcache capture`. Results go to $OUT.
#   OUT=/tmp/out MINUTES=2.5 bash recipes/gpu_train_and_capture.sh
set -uo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=true
OUT=${OUT:?set OUT}; MINUTES=${MINUTES:-2.5}
mkdir -p /tmp/corpus /tmp/ckpt "$OUT/small"
for f in .carry/corpus/*.xz; do xz -dc "$f" > "/tmp/corpus/$(basename "${f%.xz}")"; done
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c "import sys, torch, transformers, numba, pyarrow; print('python', sys.version.split()[0], 'torch', torch.__version__, 'transformers', transformers.__version__, 'numba', numba.__version__, 'pyarrow', pyarrow.__version__)"
} > "$OUT/small/env.txt" 2>&1
cat "$OUT/small/env.txt"
for arch in mixtral olmoe; do
  timeout 300 python3 recipes/train_moe.py --arch $arch --corpus /tmp/corpus --tokenizer .carry/tokenizer \
      --out /tmp/ckpt/$arch --minutes "$MINUTES" --device cuda 2>&1 | tee "$OUT/small/train_$arch.log" | tail -3
  args=()
  for d in code english poetry latex german french; do args+=(--text "$d=/tmp/corpus/$d.heldout.txt"); done
  timeout 120 python3 -m simcache capture --model /tmp/ckpt/$arch "${args[@]}" --device cuda --dtype bfloat16 \
      --max-length 512 --batch-size 32 --out "$OUT/$arch.parquet" 2>&1 | tee "$OUT/small/capture_$arch.log"
  cp /tmp/ckpt/$arch/model.safetensors "$OUT/$arch.safetensors"
  cp /tmp/ckpt/$arch/config.json "$OUT/small/${arch}_config.json"
  cp /tmp/ckpt/$arch/generation_config.json "$OUT/small/${arch}_generation_config.json" 2>/dev/null
  cp /tmp/ckpt/$arch/train_log.json "$OUT/small/${arch}_train_log.json"
done
tar -czf "$OUT/small.tar.gz" -C "$OUT" small && rm -rf "$OUT/small"
ls -la "$OUT"
