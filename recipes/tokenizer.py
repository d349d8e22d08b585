"""Train the byte-level BPE tokenizer (4,096 tokens) of the simcache sample models.

    python recipes/tokenizer.py .carry/corpus .carry/tokenizer

Trained on every domain's training text (recipes/corpus.py), so code, English, German, French,
LaTeX and classical Chinese all get merges. Saved as a transformers fast tokenizer.
"""

from __future__ import annotations

import sys
from pathlib import Path

VOCAB = 4096


def main(corpus: str, out: str):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    files = sorted(str(p) for p in Path(corpus).glob("*.train.txt"))
    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train(files, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    fast.save_pretrained(out)
    print(f"tokenizer: {tok.get_vocab_size()} tokens -> {out}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
