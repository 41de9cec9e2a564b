#!/usr/bin/python3
"""Compare the logits of model.py (PyTorch, f32) with `olmoe logits` (kdial)
for one checkpoint at every k = 1..k_pre on a text from the test split.

  check_logits.py --olmoe build/bin/olmoe --model CKPT [--data D] [--tokens 64] [--tol 1e-4]

Both read the same model.safetensors (BF16 weights are widened to f32
exactly on both sides). Exit status 1 when the max abs difference at any k is
above --tol.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import torch

import bpe
import model as M
from prepare_data import default_data_dir


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--olmoe", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", default=default_data_dir())
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--tol", type=float, default=1e-4)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    m = M.load_checkpoint(args.model).eval()
    enc = bpe.Encoder(os.path.join(args.model, "tokenizer.json"))
    with open(os.path.join(args.data, "test.jsonl"), encoding="utf-8") as f:
        text = json.loads(f.readline())["text"]
    ids = enc.encode(text)[:args.tokens]
    worst = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        for k in range(1, m.config.num_experts_per_tok + 1):
            out = os.path.join(tmp, f"k{k}.npy")
            subprocess.run([args.olmoe, "logits", "--model", args.model, "--tokens", ",".join(map(str, ids)),
                            "--out", out, "--k", str(k), "--threads", str(args.threads)], check=True,
                           capture_output=True)
            theirs = np.load(out)
            with torch.no_grad():
                mine = m(torch.tensor([ids]), k=k)[0][0].numpy()
            diff = float(np.abs(mine - theirs).max())
            agree = float((mine.argmax(-1) == theirs.argmax(-1)).mean())
            print(f"k={k}: {len(ids)} tokens x {theirs.shape[1]} logits, max |torch - kdial| = {diff:.3e} "
                  f"(max |logit| {np.abs(mine).max():.2f}), argmax agreement {agree:.3f}")
            worst = max(worst, diff)
    ok = worst <= args.tol
    print(f"{'OK' if ok else 'FAIL'}: worst max abs diff {worst:.3e} (tolerance {args.tol:g})")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
