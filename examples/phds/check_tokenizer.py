#!/usr/bin/python3
"""Check that kdial's tokenizer (olmoe tokenize --ids-only) and our Python
encoder (bpe.Encoder) give identical ids on lines of the test split, and that
decoding the ids gives the (NFC) text back.

  check_tokenizer.py --olmoe build/examples/olmoe/olmoe --model DIR [--data D] [--lines 300]

DIR holds tokenizer.json (a checkpoint directory or the data dir). Exit status
1 on any mismatch.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import unicodedata

import bpe
from prepare_data import default_data_dir


def kdial_ids(olmoe, model, text):
    with tempfile.NamedTemporaryFile("w", encoding="utf-8", suffix=".txt", delete=False) as f:
        f.write(text)
        path = f.name
    try:
        out = subprocess.run([olmoe, "tokenize", "--model", model, "--file", path, "--ids-only"],
                             check=True, capture_output=True, text=True).stdout.strip()
    finally:
        os.unlink(path)
    return [int(x) for x in out.split(",")] if out else []


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--olmoe", required=True, help="path of the olmoe executable")
    ap.add_argument("--model", default=None, help="directory with tokenizer.json (default: the data dir)")
    ap.add_argument("--data", default=default_data_dir())
    ap.add_argument("--lines", type=int, default=300)
    args = ap.parse_args()
    model = args.model or args.data
    enc = bpe.Encoder(os.path.join(model, "tokenizer.json"))

    lines = []
    with open(os.path.join(args.data, "test.jsonl"), encoding="utf-8") as f:
        docs = [json.loads(l)["text"] for l in f]
    for d in docs:
        lines += [l for l in d.split("\n") if l]
    step = max(1, len(lines) // args.lines)
    sample = lines[::step][:args.lines]
    # A few lines that exercise the regex edges: runs of spaces, newlines, tabs,
    # digits, contractions, non-ASCII letters, the special token.
    sample += ["a  b   c\n\n\td", "   leading and trailing   ", "It's 1961; they'll've 3,000.50$",
               "na\u0308ive caf\u00e9 \u00c5ngstr\u00f6m \u03b1\u03b2\u03b3 \u4e2d\u6587", "x<|endoftext|>y",
               "\u00a0nbsp\u2003em-space\u3000ideographic"]

    bad = 0
    ntok = 0
    for text in sample:
        mine = enc.encode(text)
        theirs = kdial_ids(args.olmoe, model, text)
        ntok += len(mine)
        if mine != theirs:
            bad += 1
            if bad <= 5:
                print(f"MISMATCH on {text[:60]!r}:\n  python {mine[:20]}\n  kdial  {theirs[:20]}")
        if enc.decode(mine) != unicodedata.normalize("NFC", text):
            bad += 1
            print(f"ROUND-TRIP failed on {text[:60]!r}")
    # The whole test split as one text (documents separated by <|endoftext|>).
    whole = bpe.ENDOFTEXT.join(docs)
    mine, theirs = enc.encode(whole), kdial_ids(args.olmoe, model, whole)
    whole_ok = mine == theirs
    print(f"{len(sample)} lines, {ntok} tokens: {len(sample) - bad} identical, {bad} mismatches; "
          f"whole test split ({len(mine)} tokens, {len(whole.split())} words): "
          f"{'identical' if whole_ok else 'MISMATCH'}")
    sys.exit(0 if bad == 0 and whole_ok else 1)


if __name__ == "__main__":
    main()
