#!/usr/bin/python3
"""Train a byte-level BPE tokenizer (GPT-2 scheme) on the training split and
write it as a Hugging Face tokenizer.json.

  train_tokenizer.py [--data DIR] [--vocab-size 4096] [--out DIR/tokenizer.json]

Vocabulary: ids 0..255 the bytes, then the merges in the order learned, then
<|endoftext|> as the last id (vocab-size - 1). Pre-tokenizer and decoder are
ByteLevel with the GPT-2 regex, normalizer NFC, no post-processing.
"""
import argparse
import collections
import json
import os
import time

import bpe
from prepare_data import default_data_dir


def read_docs(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f]


def tokenizer_json(vocab, merges, eos_id):
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    full_vocab = dict(vocab)
    full_vocab[bpe.ENDOFTEXT] = eos_id
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [{"id": eos_id, "content": bpe.ENDOFTEXT, "single_word": False, "lstrip": False,
                          "rstrip": False, "normalized": False, "special": True}],
        "normalizer": {"type": "NFC"},
        "pre_tokenizer": byte_level,
        "post_processor": None,
        "decoder": byte_level,
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": full_vocab, "merges": [a + " " + b for a, b in merges]},
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=default_data_dir())
    ap.add_argument("--vocab-size", type=int, default=4096, help="including the 256 bytes and <|endoftext|>")
    ap.add_argument("--out", default=None, help="default: DATA/tokenizer.json")
    args = ap.parse_args()
    out = args.out or os.path.join(args.data, "tokenizer.json")

    t0 = time.time()
    counts = collections.Counter()
    for text in read_docs(os.path.join(args.data, "train.jsonl")):
        counts.update(bpe.pretokenize(text))
    print(f"pre-tokenized: {sum(counts.values())} pieces, {len(counts)} distinct ({time.time() - t0:.1f} s)")
    vocab, merges = bpe.train(counts, args.vocab_size - 1, log=print)
    eos_id = len(vocab)
    with open(out, "w", encoding="utf-8") as f:
        json.dump(tokenizer_json(vocab, merges, eos_id), f, ensure_ascii=False, indent=1)
    print(f"vocab {eos_id + 1} (256 bytes, {len(merges)} merges, eos id {eos_id}) -> {out} "
          f"({time.time() - t0:.1f} s)")


if __name__ == "__main__":
    main()
