#!/usr/bin/python3
"""Generates include/kdial/io/unicode_tables.hpp from the Unicode Character Database.

The tokenizer needs four things the C++ standard library does not provide:
the character classes of the pre-tokenizer regexes (\\p{L}, \\p{N}, \\s) and
the data for NFC (canonical decompositions, canonical combining classes,
primary composites, and the NFC quick-check property). This script reads
Debian's `unicode-data` package (apt-get install -y unicode-data) and writes
sorted tables that unicode.hpp searches by binary search.

The NFC data is limited to the characters assigned by Unicode 9.0
(DerivedAge.txt): Hugging Face tokenizers normalises with the Rust crate
unicode-normalization-alignments 0.1.12, whose tables are Unicode 9.0.0
(its UNICODE_VERSION), so a character assigned later is unassigned there:
combining class 0, no decomposition, never composed. By Unicode's stability
policy the decompositions, combining classes and composition exclusions of the
characters assigned by 9.0 have not changed since, so the newer UCD restricted
by age gives exactly the 9.0 data. The character classes stay at the UCD's
version (they belong to the regex engine, not to the normaliser).

Usage:  /usr/bin/python3 tools/gen_unicode_tables.py [UCD_DIR] [OUTPUT]
        defaults: /usr/share/unicode  include/kdial/io/unicode_tables.hpp
"""

import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UCD = sys.argv[1] if len(sys.argv) > 1 else "/usr/share/unicode"
OUT = sys.argv[2] if len(sys.argv) > 2 else os.path.join(ROOT, "include/kdial/io/unicode_tables.hpp")

# Character classes used by the split regexes (values must match unicode.hpp).
CLS_OTHER, CLS_LETTER, CLS_NUMBER, CLS_SPACE = 0, 1, 2, 3

# The Unicode version of the normalisation data (see the docstring).
NORMALIZATION_VERSION = (9, 0)


def read_unicode_data():
    """Yields (code point, fields) for every assigned code point, expanding First/Last ranges."""
    path = os.path.join(UCD, "UnicodeData.txt")
    first = None
    with open(path, encoding="utf-8") as f:
        for line in f:
            fields = line.rstrip("\n").split(";")
            cp = int(fields[0], 16)
            name = fields[1]
            if name.endswith(", First>"):
                first = cp
                continue
            if name.endswith(", Last>"):
                for c in range(first, cp + 1):
                    yield c, fields
                first = None
                continue
            yield cp, fields


def read_property(filename, wanted):
    """Code points whose property column (field 1) equals `wanted` (field 2 optional)."""
    out = {}
    with open(os.path.join(UCD, filename), encoding="utf-8") as f:
        for line in f:
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            parts = [p.strip() for p in line.split(";")]
            if parts[1] != wanted:
                continue
            value = parts[2] if len(parts) > 2 else True
            lo, _, hi = parts[0].partition("..")
            for c in range(int(lo, 16), int(hi or lo, 16) + 1):
                out[c] = value
    return out


def read_ages():
    """Code point -> (major, minor) of the version that assigned it (DerivedAge.txt)."""
    out = {}
    with open(os.path.join(UCD, "DerivedAge.txt"), encoding="utf-8") as f:
        for line in f:
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            rng, age = [p.strip() for p in line.split(";")]
            major, minor = (int(x) for x in age.split("."))
            lo, _, hi = rng.partition("..")
            for c in range(int(lo, 16), int(hi or lo, 16) + 1):
                out[c] = (major, minor)
    return out


def ucd_version():
    with open(os.path.join(UCD, "DerivedNormalizationProps.txt"), encoding="utf-8") as f:
        m = re.match(r"# DerivedNormalizationProps-([0-9.]+)\.txt", f.readline())
    return m.group(1) if m else "unknown"


def ranges(values):
    """[(first, last, value)] runs of equal value over sorted code points (gaps end a run)."""
    out = []
    for c in sorted(values):
        v = values[c]
        if out and out[-1][1] == c - 1 and out[-1][2] == v:
            out[-1][1] = c
        else:
            out.append([c, c, v])
    return out


def emit_array(name, ctype, rows, per_line):
    lines = ["inline constexpr %s %s[] = {" % (ctype, name)]
    for i in range(0, len(rows), per_line):
        lines.append("    " + " ".join(rows[i:i + per_line]))
    lines.append("};")
    return "\n".join(lines)


def main():
    cls = {}
    ccc = {}
    decomp = {}
    for cp, fields in read_unicode_data():
        gc = fields[2]
        if gc[0] == "L":
            cls[cp] = CLS_LETTER
        elif gc[0] == "N":
            cls[cp] = CLS_NUMBER
        if int(fields[3]) != 0:
            ccc[cp] = int(fields[3])
        d = fields[5]
        if d and not d.startswith("<"):  # canonical decompositions only
            parts = [int(x, 16) for x in d.split()]
            assert 1 <= len(parts) <= 2, (cp, d)
            decomp[cp] = parts
    for cp in read_property("PropList.txt", "White_Space"):
        assert cp not in cls, hex(cp)
        cls[cp] = CLS_SPACE

    # Normalisation data of the characters assigned by NORMALIZATION_VERSION only.
    ages = read_ages()
    def old(c):
        return c in ages and ages[c] <= NORMALIZATION_VERSION
    n_newer = (sum(1 for c in ccc if not old(c)), sum(1 for c in decomp if not old(c)))
    ccc = {c: v for c, v in ccc.items() if old(c)}
    decomp = {c: p for c, p in decomp.items() if old(c)}
    assert all(old(x) for p in decomp.values() for x in p), "a 9.0 decomposition uses a newer character"

    comp_ex = read_property("DerivedNormalizationProps.txt", "Full_Composition_Exclusion")
    nfc_qc = {c: v for c, v in read_property("DerivedNormalizationProps.txt", "NFC_QC").items() if old(c)}  # N or M
    compositions = sorted((p[0], p[1], cp) for cp, p in decomp.items() if len(p) == 2 and cp not in comp_ex)
    # The quick check must send every character that can compose with the one
    # before it (the second of a pair, NFC_QC Maybe) to the full algorithm.
    assert all(second in nfc_qc for _, second, _ in compositions)

    # Sanity checks on what unicode.hpp assumes.
    assert all(c >= 0x300 for c in ccc) and all(c >= 0x300 for c in nfc_qc), "fast path below U+0300"
    assert all(0 < v < 255 for v in ccc.values())

    class_rows = ["{0x%X, 0x%X, %d}," % (a, b, v) for a, b, v in ranges(cls)]
    ccc_rows = ["{0x%X, 0x%X, %d}," % (a, b, v) for a, b, v in ranges(ccc)]
    decomp_rows = ["{0x%X, 0x%X, 0x%X}," % (cp, p[0], p[1] if len(p) == 2 else 0) for cp, p in sorted(decomp.items())]
    comp_rows = ["{0x%X, 0x%X, 0x%X}," % t for t in compositions]
    qc_rows = ["{0x%X, 0x%X}," % (a, b) for a, b, _ in ranges({c: 1 for c in nfc_qc})]

    version = ucd_version()
    nver = "%d.%d" % NORMALIZATION_VERSION
    text = f"""// GENERATED by tools/gen_unicode_tables.py from the Unicode Character Database {version}
// (Debian package unicode-data: UnicodeData.txt, PropList.txt, DerivedNormalizationProps.txt,
// DerivedAge.txt). Do not edit by hand; rerun the script. Sorted tables searched by binary
// search in unicode.hpp: character classes for the tokenizer's split regexes (\\p{{L}}, \\p{{N}},
// White_Space; UCD {version}) and the NFC data (canonical decompositions, combining classes,
// primary composites without Full_Composition_Exclusion, NFC_QC != Yes) of the characters
// assigned by Unicode {nver} only, as Hugging Face tokenizers' normaliser has them (left out:
// {n_newer[0]} later characters with a combining class, {n_newer[1]} with a decomposition).
// Hangul is algorithmic.
#pragma once

#include <cstdint>

namespace kdial::io::detail::unicode_tables {{

inline constexpr const char* ucd_version = "{version}";
// The Unicode version of the normalisation data (NFC): characters assigned later are
// unassigned for NFC (class 0, no decomposition, no composition).
inline constexpr const char* normalization_version = "{nver}";

// A run of code points [first, last] sharing one value.
struct range_value {{
    char32_t first;
    char32_t last;
    std::uint8_t value;
}};
struct range {{
    char32_t first;
    char32_t last;
}};
// cp -> first second (second == 0: singleton decomposition).
struct decomposition {{
    char32_t cp;
    char32_t first;
    char32_t second;
}};
// first + second -> composite, sorted by (first, second).
struct composition {{
    char32_t first;
    char32_t second;
    char32_t composite;
}};

// clang-format off
// value: 1 letter (L*), 2 number (N*), 3 White_Space; absent ranges are "other".
{emit_array("char_classes", "range_value", class_rows, 4)}

// value: canonical combining class (absent ranges are 0).
{emit_array("combining_classes", "range_value", ccc_rows, 4)}

{emit_array("canonical_decompositions", "decomposition", decomp_rows, 4)}

{emit_array("canonical_compositions", "composition", comp_rows, 4)}

// NFC_QC is No or Maybe.
{emit_array("nfc_quick_check_not_yes", "range", qc_rows, 5)}
// clang-format on

}} // namespace kdial::io::detail::unicode_tables
"""
    with open(OUT, "w", encoding="utf-8") as f:
        f.write(text)
    print("%s: %d bytes; %d class ranges, %d ccc ranges, %d decompositions, %d compositions, %d QC ranges"
          % (OUT, len(text), len(class_rows), len(ccc_rows), len(decomp_rows), len(comp_rows), len(qc_rows)))


if __name__ == "__main__":
    main()
