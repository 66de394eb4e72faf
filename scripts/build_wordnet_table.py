"""Rebuild ``bgminer/data/imagenet_wordnet.tsv``: each ImageNet-1k class's WordNet lemmas and the
lemmas of all its hypernyms, for offline text search ("furniture", "dog", "musical instrument").

ImageNet's class ids are WordNet 3.0 noun synsets (``n`` + the 8-digit offset into
``data.noun``); Debian's ``wordnet-base`` ships WordNet 3.0. The class order is timm's
(``timm.data.ImageNetInfo``, the standard ImageNet-1k order the classifier's logits use).

    apt-get install -y wordnet-base
    python scripts/build_wordnet_table.py          # same WordNet + same timm -> same file
    python scripts/build_wordnet_table.py --check  # exit 1 when the committed table differs

The table also carries WordNet's irregular noun plurals (``noun.exc``) for the words it
uses ("geese" -> "goose"), so the runtime needs neither WordNet nor nltk.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TABLE = REPO / "bgminer" / "data" / "imagenet_wordnet.tsv"
WORDNET = Path("/usr/share/wordnet")
HYPERNYM_POINTERS = {"@", "@i"}  # hypernym, instance hypernym
# Hypernym links WordNet 3.0 lacks that ImageNet's classes need; each one is written in the table's header.
# bus.n.01 sits only under "public transport", so minibus, school bus and trolleybus were no "vehicle".
EXTRA_HYPERNYMS = {"02924116": ["03791235"]}  # bus -> motor vehicle

HEADER = """\
# ImageNet-1k classes in the standard class order, with their WordNet 3.0 lemmas.
# Built by scripts/build_wordnet_table.py from Debian's wordnet-base (data.noun, noun.exc).
# Rows 'class': index, wnid, the class's own lemmas, the lemmas of all its hypernyms
#   (transitively, nearest first, each once). Lemmas are separated by '|', words by spaces.
# Rows 'plural': an irregular noun plural and its singular(s), for the words used above.
#
# WordNet 3.0 Copyright 2006 by Princeton University. All rights reserved.
# THIS SOFTWARE AND DATABASE IS PROVIDED "AS IS" AND PRINCETON UNIVERSITY MAKES NO
# REPRESENTATIONS OR WARRANTIES, EXPRESS OR IMPLIED. BY WAY OF EXAMPLE, BUT NOT LIMITATION,
# PRINCETON UNIVERSITY MAKES NO REPRESENTATIONS OR WARRANTIES OF MERCHANTABILITY OR FITNESS
# FOR ANY PARTICULAR PURPOSE OR THAT THE USE OF THE LICENSED SOFTWARE, DATABASE OR
# DOCUMENTATION WILL NOT INFRINGE ANY THIRD PARTY PATENTS, COPYRIGHTS, TRADEMARKS OR OTHER
# RIGHTS. (WordNet licence: https://wordnet.princeton.edu/license-and-commercial-use)
"""


def parse_data_noun(path: Path) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """``data.noun`` -> (offset -> lemmas, offset -> hypernym offsets), per the wndb(5WN) format:
    ``offset lex_filenum ss_type w_cnt [word lex_id]... p_cnt [ptr_symbol offset pos source/target]... | gloss``.
    """
    lemmas: dict[str, list[str]] = {}
    parents: dict[str, list[str]] = {}
    with path.open(encoding="utf-8") as f:
        for line in f:
            if line.startswith("  "):  # the licence header
                continue
            fields = line.split(" | ", 1)[0].split()
            offset, w_cnt = fields[0], int(fields[3], 16)
            words = fields[4 : 4 + 2 * w_cnt : 2]
            p_cnt = int(fields[4 + 2 * w_cnt])
            ptrs = fields[5 + 2 * w_cnt : 5 + 2 * w_cnt + 4 * p_cnt]
            assert len(ptrs) == 4 * p_cnt, f"short pointer list at {offset}"
            lemmas[offset] = [w.replace("_", " ") for w in words]
            parents[offset] = [ptrs[i + 1] for i in range(0, len(ptrs), 4) if ptrs[i] in HYPERNYM_POINTERS and ptrs[i + 2] == "n"]
    for offset, extra in EXTRA_HYPERNYMS.items():
        if offset in parents:
            parents[offset] += [p for p in extra if p in lemmas and p not in parents[offset]]
    return lemmas, parents


def hypernyms(offset: str, parents: dict[str, list[str]]) -> list[str]:
    """Every ancestor of ``offset``, breadth first (nearest first), each once."""
    seen: list[str] = []
    frontier = list(parents[offset])
    while frontier:
        nxt = []
        for p in frontier:
            if p not in seen:
                seen.append(p)
                nxt.extend(parents[p])
        frontier = nxt
    return seen


def unique(items: list[str], exclude: set[str] = frozenset()) -> list[str]:
    out, seen = [], set(exclude)
    for item in items:
        if item.lower() not in seen:
            seen.add(item.lower())
            out.append(item)
    return out


def build(wnids: list[str], wordnet: Path) -> str:
    lemmas, parents = parse_data_noun(wordnet / "data.noun")
    rows, used_words = [], set()
    for index, wnid in enumerate(wnids):
        offset = wnid[1:]
        assert wnid[0] == "n" and offset in lemmas, f"{wnid} is not a WordNet 3.0 noun synset"
        own = unique(lemmas[offset])
        broader = unique([lemma for h in hypernyms(offset, parents) for lemma in lemmas[h]], {x.lower() for x in own})
        for lemma in own + broader:
            assert "|" not in lemma and "\t" not in lemma, lemma
            used_words.update(re.findall(r"[a-z0-9]+", lemma.lower()))
        rows.append(f"class\t{index}\t{wnid}\t{'|'.join(own)}\t{'|'.join(broader)}")
    plurals = []
    for line in (wordnet / "noun.exc").read_text(encoding="utf-8").splitlines():
        plural, *singulars = line.split()
        singulars = [s for s in singulars if s != plural and s in used_words]  # one-word singulars the table uses
        if plural.isalpha() and singulars:
            plurals.append(f"plural\t{plural}\t{'|'.join(singulars)}")
    added = [(o, p) for o, ps in EXTRA_HYPERNYMS.items() for p in ps if p in parents.get(o, ())]
    notes = "".join(f"# Added hypernym: {lemmas[o][0]} ({o}) -> {lemmas[p][0]} ({p})\n" for o, p in added)
    return HEADER + notes + "\n".join(rows + plurals) + "\n"


def imagenet_wnids() -> list[str]:
    from timm.data import ImageNetInfo

    return list(ImageNetInfo().label_names())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--wordnet", type=Path, default=WORDNET, help="folder holding data.noun and noun.exc")
    ap.add_argument("--out", type=Path, default=TABLE)
    ap.add_argument("--check", action="store_true", help="only compare with the existing table")
    args = ap.parse_args(argv)
    if not (args.wordnet / "data.noun").exists():
        sys.exit(f"{args.wordnet}/data.noun not found: apt-get install -y wordnet-base")
    wnids = imagenet_wnids()
    assert len(wnids) == 1000 and len(set(wnids)) == 1000
    text = build(wnids, args.wordnet)
    if args.check:
        same = args.out.exists() and args.out.read_text(encoding="utf-8") == text
        print(f"{args.out}: {'up to date' if same else 'differs'}")
        return 0 if same else 1
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text, encoding="utf-8")
    print(f"wrote {args.out} ({args.out.stat().st_size} bytes, {len(wnids)} classes)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
