#!/usr/bin/python3
"""Build a multiple-choice cloze probe from the test split: each item is a
context (the preceding words of a document, up to --context-words) and four
candidate next words, one of them the word that really follows. Distractors
are words of the test split of similar frequency (the 200 words around the
answer in the frequency ranking), and answers are never among the 100 most
frequent words, so the right answer is not given away by being common.

  make_cloze.py [--data D] [--items 500] [--seed 1234] [--out D/cloze.jsonl]

One JSON object per line: {"doc", "context", "choices": [4 strings, each
with its leading space], "answer": index}. Deterministic given --seed.
Answer-level cross-sparsity agreement (issue 13): the share of items where
the choice made at k equals the choice made at the trained k, a choice being
the candidate with the highest summed log-probability of its tokens.
"""
import argparse
import collections
import json
import os
import random
import re

from prepare_data import default_data_dir

WORD = re.compile(r"^[a-z]{3,}$")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=default_data_dir())
    ap.add_argument("--items", type=int, default=500)
    ap.add_argument("--context-words", type=int, default=48)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--skip-top", type=int, default=100, help="answers are not among the N most frequent words")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    with open(os.path.join(args.data, "test.jsonl"), encoding="utf-8") as f:
        docs = [json.loads(l) for l in f]
    freq = collections.Counter(w for d in docs for w in d["text"].split() if WORD.match(w))
    ranked = [w for w, _ in sorted(freq.items(), key=lambda x: (-x[1], x[0]))]
    rank = {w: i for i, w in enumerate(ranked)}
    band = 200  # distractors come from the answer's neighbourhood in the frequency ranking

    # Answers skip the --skip-top most frequent words (function words a
    # unigram guess gets right) and the tail where a full band does not fit,
    # so the band is symmetric and the answer is not the most frequent
    # candidate by construction.
    sites = []
    for d in docs:
        words = d["text"].split(" ")
        for i in range(args.context_words, len(words)):
            w = words[i]
            if WORD.match(w) and "\n" not in words[i - 1] and args.skip_top <= rank[w] < len(ranked) - band // 2:
                sites.append((d["id"], words, i))
    rng.shuffle(sites)
    items = []
    for doc_id, words, i in sites[:args.items]:
        answer = words[i]
        r = rank[answer]
        pool = [w for w in ranked[r - band // 2:r + band // 2] if w != answer]
        choices = rng.sample(pool, 3) + [answer]
        rng.shuffle(choices)
        items.append({"doc": doc_id, "context": " ".join(words[i - args.context_words:i]),
                      "choices": [" " + c for c in choices], "answer": choices.index(answer)})
    out = args.out or os.path.join(args.data, "cloze.jsonl")
    with open(out, "w", encoding="utf-8") as f:
        for it in items:
            f.write(json.dumps(it) + "\n")
    unigram = sum(max(it["choices"], key=lambda c: (freq[c[1:]], c)) == it["choices"][it["answer"]]
                  for it in items) / max(1, len(items))
    print(f"frequency-only baseline (pick the most frequent candidate): {unigram:.3f}; chance 0.25")
    print(f"{len(items)} items from {len(sites)} candidate sites, {len(ranked)} distinct words -> {out}")


if __name__ == "__main__":
    main()
