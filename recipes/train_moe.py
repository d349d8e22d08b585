"""Train a small MoE language model from random initialisation on the multi-domain corpus.

Two shapes, both real transformers classes:

* ``mixtral``: MixtralForCausalLM, 8 experts, top-2 (the shape of Mixtral-8x7B, scaled down);
* ``olmoe``: OlmoeForCausalLM, 32 fine-grained experts, top-4.

Both: 4 layers, hidden 192, vocab 4,096 (recipes/tokenizer.py), 512-token context, tied
embeddings, load-balancing auxiliary loss 0.01. Training samples 256-token windows from the
domains with weights proportional to the square root of their size (so classical Chinese, the
smallest, is oversampled), AdamW (lr 2e-3, 100 warm-up steps, cosine decay to 10 % over the time
budget), bf16 autocast, seed 0. It stops at ``--minutes`` of wall time and saves the model in
bf16 with its tokenizer, plus ``train_log.json`` (loss curve, final train and per-domain
held-out loss, steps, tokens, time).

    python recipes/train_moe.py --arch mixtral --corpus .carry/corpus --tokenizer .carry/tokenizer \\
        --out ckpt/mixtral --minutes 3 --device cuda
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np

DOMAINS = ("code", "english", "poetry", "latex", "german", "french")


def config(arch: str):
    from transformers import MixtralConfig, OlmoeConfig

    common = dict(vocab_size=4096, hidden_size=192, num_hidden_layers=4, num_attention_heads=4,
                  max_position_embeddings=512, tie_word_embeddings=True, output_router_logits=True,
                  router_aux_loss_coef=0.01, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    if arch == "mixtral":
        return MixtralConfig(intermediate_size=256, num_key_value_heads=2, num_local_experts=8,
                             num_experts_per_tok=2, **common)
    if arch == "olmoe":
        return OlmoeConfig(intermediate_size=64, num_key_value_heads=4, num_experts=32,
                           num_experts_per_tok=4, **common)
    raise SystemExit(f"unknown arch {arch}")


def tokenize(tokenizer, path: Path) -> np.ndarray:
    text = path.read_text()
    lines = text.split("\n\n")
    ids = tokenizer(lines, add_special_tokens=False)["input_ids"]
    sep = tokenizer.eos_token_id
    flat = [t for piece in ids for t in (piece + [sep])]
    return np.asarray(flat, np.int16 if max(flat) < 32768 else np.int32)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", required=True, choices=["mixtral", "olmoe"])
    ap.add_argument("--corpus", type=Path, required=True)
    ap.add_argument("--tokenizer", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--minutes", type=float, default=3.0)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    t0 = time.time()
    train = {d: tokenize(tok, args.corpus / f"{d}.train.txt") for d in DOMAINS}
    held = {d: tokenize(tok, args.corpus / f"{d}.heldout.txt") for d in DOMAINS}
    sizes = np.array([len(train[d]) for d in DOMAINS], float)
    weights = np.sqrt(sizes) / np.sqrt(sizes).sum()
    print(f"tokenized in {time.time() - t0:.1f}s: " + ", ".join(f"{d} {len(train[d]):,}" for d in DOMAINS), flush=True)

    cfg = config(args.arch)
    model = AutoModelForCausalLM.from_config(cfg).to(args.device)
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    budget = args.minutes * 60

    def batch(source):
        rows = []
        for d in rng.choice(len(DOMAINS), size=args.batch, p=weights):
            arr = source[DOMAINS[d]]
            start = rng.integers(0, len(arr) - args.seq - 1)
            rows.append(arr[start: start + args.seq].astype(np.int64))
        return torch.tensor(np.stack(rows), device=args.device)

    log, step, tokens = [], 0, 0
    start = time.time()
    model.train()
    while time.time() - start < budget:
        frac = (time.time() - start) / budget
        lr = args.lr * min(1.0, (step + 1) / 100) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        for g in opt.param_groups:
            g["lr"] = lr
        ids = batch(train)
        with torch.autocast(device_type="cuda" if "cuda" in args.device else "cpu", dtype=torch.bfloat16):
            out = model(input_ids=ids, labels=ids)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        tokens += ids.numel()
        if step % 50 == 0 or step == 1:
            rec = {"step": step, "seconds": round(time.time() - start, 1), "loss": float(out.loss),
                   "aux_loss": float(getattr(out, "aux_loss", 0.0) or 0.0), "lr": lr}
            log.append(rec)
            print(json.dumps(rec), flush=True)
    train_seconds = time.time() - start

    model.eval()
    held_loss = {}
    with torch.no_grad(), torch.autocast(device_type="cuda" if "cuda" in args.device else "cpu", dtype=torch.bfloat16):
        for d in DOMAINS:
            arr = held[d]
            losses = []
            for lo in range(0, min(len(arr) - args.seq - 1, 32 * args.seq), args.seq):
                ids = torch.tensor(arr[lo: lo + args.seq].astype(np.int64)[None], device=args.device)
                losses.append(float(model(input_ids=ids, labels=ids).loss))
            held_loss[d] = float(np.mean(losses)) if losses else None
    model.config.output_router_logits = False
    model.to(torch.bfloat16).save_pretrained(args.out)
    tok.save_pretrained(args.out)
    summary = {
        "arch": args.arch, "parameters": n_params, "steps": step, "tokens": tokens,
        "train_seconds": round(train_seconds, 1), "tokens_per_s": round(tokens / train_seconds),
        "final_train_loss": log[-1]["loss"] if log else None, "heldout_loss": held_loss,
        "batch": args.batch, "seq": args.seq, "lr": args.lr, "seed": args.seed,
        "domain_weights": dict(zip(DOMAINS, weights.round(4).tolist())),
        "device": torch.cuda.get_device_name() if "cuda" in args.device else "cpu",
        "torch": torch.__version__, "log": log,
    }
    (args.out / "train_log.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps({k: v for k, v in summary.items() if k != "log"}), flush=True)


if __name__ == "__main__":
    main()
