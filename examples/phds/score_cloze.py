#!/usr/bin/python3
"""Score the cloze probe (make_cloze.py) with model.py at each k: accuracy,
and answer-level cross-sparsity agreement with the reference k (the share of
items whose chosen candidate equals the reference k's choice). A PyTorch
preview of the metric; the issue wants it from `olmoe sweep` in the end.

  score_cloze.py --model CKPT [CKPT ...] [--data D] [--ks 1,2,3,4] [--ref-k 4]
"""
import argparse
import json
import os

import torch

import bpe
import model as M
from prepare_data import default_data_dir


@torch.no_grad()
def choices_at(m, enc, items, k):
    picks = []
    for it in items:
        ctx = enc.encode(it["context"])
        seqs, spans = [], []
        for c in it["choices"]:
            ids = enc.encode(it["context"] + c)
            assert ids[:len(ctx)] == ctx, "context and choice do not tokenise apart"
            seqs.append(ids)
            spans.append((len(ctx), len(ids)))
        T = max(len(s) for s in seqs)
        x = torch.tensor([s + [0] * (T - len(s)) for s in seqs])  # right padding: causal, so harmless
        logp = torch.log_softmax(m(x, k=k)[0].float(), dim=-1)
        scores = [sum(logp[i, t - 1, seqs[i][t]].item() for t in range(a, b)) for i, (a, b) in enumerate(spans)]
        picks.append(max(range(len(scores)), key=lambda i: scores[i]))
    return picks


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", nargs="+", required=True)
    ap.add_argument("--data", default=default_data_dir())
    ap.add_argument("--cloze", default=None, help="default: DATA/cloze.jsonl")
    ap.add_argument("--ks", default="1,2,3,4")
    ap.add_argument("--ref-k", type=int, default=None, help="default: the trained k")
    ap.add_argument("--items", type=int, default=None)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with open(args.cloze or os.path.join(args.data, "cloze.jsonl"), encoding="utf-8") as f:
        items = [json.loads(l) for l in f][:args.items]
    ks = [int(k) for k in args.ks.split(",")]
    for path in args.model:
        m = M.load_checkpoint(path).eval()
        enc = bpe.Encoder(os.path.join(path, "tokenizer.json"))
        ref_k = args.ref_k or m.config.num_experts_per_tok
        ref = choices_at(m, enc, items, ref_k)
        for k in ks:
            p = ref if k == ref_k else choices_at(m, enc, items, k)
            acc = sum(a == it["answer"] for a, it in zip(p, items)) / len(items)
            agree = sum(a == b for a, b in zip(p, ref)) / len(items)
            print(f"{os.path.basename(os.path.normpath(path)):14s} k={k}: cloze accuracy {acc:.3f}, "
                  f"answer agreement with k={ref_k} {agree:.3f} ({len(items)} items)", flush=True)


if __name__ == "__main__":
    main()
