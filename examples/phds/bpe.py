"""Byte-level BPE (GPT-2 scheme) in plain Python: the pre-tokenizer, the
byte <-> unicode alphabet, an encoder that reads our tokenizer.json, and a
trainer. Used by train_tokenizer.py, check_tokenizer.py and train.py.

The GPT-2 split regex needs \\p{L}, \\p{N} and \\s = Unicode White_Space; Python's
`re` has no \\p{..}, so the character classes are built once from
unicodedata (general categories L*, N*) and the White_Space list.
"""
import heapq
import json
import re
import sys
import unicodedata

ENDOFTEXT = "<|endoftext|>"

# Unicode White_Space property (PropList.txt), which is what \s means in the
# tokenizers library's regex engine.
WHITE_SPACE = [(0x09, 0x0D), (0x20, 0x20), (0x85, 0x85), (0xA0, 0xA0), (0x1680, 0x1680), (0x2000, 0x200A),
               (0x2028, 0x2029), (0x202F, 0x202F), (0x205F, 0x205F), (0x3000, 0x3000)]


def _ranges(pred):
    out, start = [], None
    for cp in range(sys.maxunicode + 1):
        if pred(cp):
            if start is None:
                start = cp
        elif start is not None:
            out.append((start, cp - 1))
            start = None
    if start is not None:
        out.append((start, sys.maxunicode))
    return out


def _cls(ranges):
    def esc(cp):
        return "\\U%08x" % cp
    return "".join(esc(a) if a == b else esc(a) + "-" + esc(b) for a, b in ranges)


_split_re = None


def split_regex():
    """GPT-2 split: 's|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+"""
    global _split_re
    if _split_re is None:
        L = _cls(_ranges(lambda c: unicodedata.category(chr(c))[0] == "L"))
        N = _cls(_ranges(lambda c: unicodedata.category(chr(c))[0] == "N"))
        S = _cls(WHITE_SPACE)
        pat = (rf"'s|'t|'re|'ve|'m|'ll|'d| ?[{L}]+| ?[{N}]+| ?[^{S}{L}{N}]+|[{S}]+(?![^{S}])|[{S}]+")
        _split_re = re.compile(pat)
    return _split_re


def bytes_to_unicode():
    """GPT-2's byte -> printable character table."""
    keep = list(range(0x21, 0x7F)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    table, n = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(0x100 + n)
            n += 1
    return table


BYTE_CHAR = bytes_to_unicode()
CHAR_BYTE = {c: b for b, c in BYTE_CHAR.items()}


def pretokenize(text):
    """NFC, then the GPT-2 split, then each piece mapped to the byte alphabet."""
    text = unicodedata.normalize("NFC", text)
    return ["".join(BYTE_CHAR[b] for b in m.group(0).encode("utf-8")) for m in split_regex().finditer(text)]


class Encoder:
    """Encodes text with a tokenizer.json written by train_tokenizer.py."""

    def __init__(self, path):
        with open(path, encoding="utf-8") as f:
            j = json.load(f)
        self.vocab = j["model"]["vocab"]
        self.id_to_token = {i: t for t, i in self.vocab.items()}
        self.ranks = {}
        for r, m in enumerate(j["model"]["merges"]):
            a, b = m.split(" ") if isinstance(m, str) else m
            self.ranks[(a, b)] = r
        self.special = {t["content"]: t["id"] for t in j["added_tokens"]}
        for c, i in self.special.items():
            self.id_to_token[i] = c
        self.cache = {}
        self.special_re = re.compile("|".join(re.escape(s) for s in sorted(self.special, key=len, reverse=True)))

    def bpe(self, piece):
        if piece in self.cache:
            return self.cache[piece]
        syms = list(piece)
        while len(syms) > 1:
            best, at = None, -1
            for i in range(len(syms) - 1):
                r = self.ranks.get((syms[i], syms[i + 1]))
                if r is not None and (best is None or r < best):
                    best, at = r, i
            if best is None:
                break
            syms[at:at + 2] = [syms[at] + syms[at + 1]]
        ids = [self.vocab[s] for s in syms]
        self.cache[piece] = ids
        return ids

    def encode(self, text):
        ids, pos = [], 0
        for m in self.special_re.finditer(text) if self.special else []:
            ids += self._encode_plain(text[pos:m.start()])
            ids.append(self.special[m.group(0)])
            pos = m.end()
        ids += self._encode_plain(text[pos:])
        return ids

    def _encode_plain(self, text):
        out = []
        for p in pretokenize(text):
            out += self.bpe(p)
        return out

    def decode(self, ids):
        data = bytearray()
        for i in ids:
            t = self.id_to_token[i]
            if t in self.special:
                data += t.encode("utf-8")
            else:
                data += bytes(CHAR_BYTE[c] for c in t)
        return data.decode("utf-8", errors="replace")


def train(word_counts, vocab_size, log=None):
    """Learns merges from {piece (byte alphabet): count}. Returns (vocab, merges):
    ids 0..255 are the bytes (in byte order), then one id per merge; the
    caller adds the special token. Incremental pair counts: each merge only
    revisits the words that contain the merged pair. Ties in count are broken
    by the lexicographically smallest (left, right) pair, so training is
    deterministic."""
    symbols = [BYTE_CHAR[b] for b in range(256)]
    sym_id = {s: i for i, s in enumerate(symbols)}
    words = [[sym_id[c] for c in w] for w in word_counts]
    freqs = list(word_counts.values())
    pair_count, where = {}, {}
    for wi, w in enumerate(words):
        f = freqs[wi]
        for a, b in zip(w, w[1:]):
            pair_count[(a, b)] = pair_count.get((a, b), 0) + f
            where.setdefault((a, b), set()).add(wi)
    heap = [(-c, symbols[a], symbols[b], (a, b)) for (a, b), c in pair_count.items()]
    heapq.heapify(heap)
    merges = []
    while len(symbols) < vocab_size and heap:
        negc, _, _, pair = heapq.heappop(heap)
        c = pair_count.get(pair, 0)
        if c != -negc:  # stale entry
            if c > 0:
                heapq.heappush(heap, (-c, symbols[pair[0]], symbols[pair[1]], pair))
            continue
        if c < 2:
            break
        a, b = pair
        joined = symbols[a] + symbols[b]
        new = sym_id.get(joined)
        if new is None:  # two merge paths can spell the same string: one id
            new = len(symbols)
            symbols.append(joined)
            sym_id[joined] = new
        merges.append((symbols[a], symbols[b]))
        touched = {}
        for wi in where.pop(pair, ()):
            w, f = words[wi], freqs[wi]
            for p in zip(w, w[1:]):
                pair_count[p] -= f
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and w[i] == a and w[i + 1] == b:
                    out.append(new)
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            words[wi] = out
            for p in zip(out, out[1:]):
                pair_count[p] = pair_count.get(p, 0) + f
                where.setdefault(p, set()).add(wi)
                touched[p] = True
        pair_count.pop(pair, None)
        for p in touched:
            c2 = pair_count.get(p, 0)
            if c2 > 0:
                heapq.heappush(heap, (-c2, symbols[p[0]], symbols[p[1]], p))
        if log and len(merges) % 500 == 0:
            log(f"  {len(merges)} merges, last {symbols[-1]!r} count {c}")
    return dict(sym_id), merges
