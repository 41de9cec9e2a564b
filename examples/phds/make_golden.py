#!/usr/bin/python3
"""Write the golden files of a shipped checkpoint: the PyTorch logits
(model.py, f32) of a fixed token sequence at every k = 1..k_pre, which the
CTest tests golden_phds_NAME_kK compare with `olmoe logits` within 1e-4
(tests/CMakeLists.txt, tests/golden/run_golden.cmake).

  make_golden.py --model CKPT --out DIR [--text FILE] [--tokens 32]

Writes DIR/tokens.txt (the ids, comma-separated: the first --tokens tokens of
--text, by default examples/phds/checkpoints/test-slice.txt, encoded with the
checkpoint's tokenizer.json) and DIR/ref_logits.k{1..k_pre}.npy (float32
[tokens, vocab]). For the shipped checkpoints:

  make_golden.py --model checkpoints/base --out ../../tests/golden/phds/base
  make_golden.py --model checkpoints/phds --out ../../tests/golden/phds/phds

With --olmoe OLMOE it also runs `olmoe logits` at each k and prints the max
abs difference (the check the tests make), exit status 1 above --tol.
"""
import argparse
import os
import subprocess
import sys
import tempfile

import numpy as np
import torch

import bpe
import model as M

HERE = os.path.dirname(os.path.abspath(__file__))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--text", default=os.path.join(HERE, "checkpoints", "test-slice.txt"))
    ap.add_argument("--tokens", type=int, default=32, help="sequence length (32: 512 KiB per k at vocab 4096)")
    ap.add_argument("--olmoe", default=None, help="also compare with `olmoe logits` (the tests' check)")
    ap.add_argument("--tol", type=float, default=1e-4)
    args = ap.parse_args()
    torch.set_num_threads(1)

    m = M.load_checkpoint(args.model).eval()
    enc = bpe.Encoder(os.path.join(args.model, "tokenizer.json"))
    with open(args.text, encoding="utf-8") as f:
        ids = enc.encode(f.read())[:args.tokens]
    assert len(ids) == args.tokens, f"{args.text}: only {len(ids)} tokens"
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "tokens.txt"), "w") as f:
        f.write(",".join(map(str, ids)) + "\n")
    k_pre = m.config.num_experts_per_tok
    worst = 0.0
    for k in range(1, k_pre + 1):
        with torch.no_grad():
            logits = m(torch.tensor([ids]), k=k)[0][0].float().numpy().astype(np.float32)
        path = os.path.join(args.out, f"ref_logits.k{k}.npy")
        np.save(path, logits)
        line = f"k={k}: wrote {path} {logits.shape}, max |logit| {np.abs(logits).max():.2f}"
        if args.olmoe:
            with tempfile.TemporaryDirectory() as tmp:
                out = os.path.join(tmp, "kdial.npy")
                subprocess.run([args.olmoe, "logits", "--model", args.model, "--tokens", ",".join(map(str, ids)),
                                "--out", out, "--k", str(k), "--threads", "2"], check=True, capture_output=True)
                diff = float(np.abs(np.load(out) - logits).max())
            worst = max(worst, diff)
            line += f"; max |torch - kdial| {diff:.3e}"
        print(line)
    print(f"wrote {args.out}/tokens.txt ({len(ids)} tokens) and ref_logits.k1..{k_pre}.npy")
    if args.olmoe:
        ok = worst <= args.tol
        print(f"{'OK' if ok else 'FAIL'}: worst max abs diff {worst:.3e} (tolerance {args.tol:g})")
        sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
