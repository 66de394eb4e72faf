"""Offline text search: match a query to ImageNet classes through WordNet, then rank images by
the pretrained model's probability mass on the matched classes.

No language model is needed (or reachable). ImageNet's class ids are WordNet 3.0 noun synsets;
``data/imagenet_wordnet.tsv`` (built once by ``scripts/build_wordnet_table.py``) holds each
class's own lemmas and the lemmas of all its hypernyms, so a broader word finds every class
under it ("dog" -> every breed, "furniture", "musical instrument", "footwear").

A query matches a class when the whole query equals one of those lemmas (case, punctuation and
a plural ending aside): "dog" finds the breeds but not "hot dog" or "dogsled". Only when no
lemma equals the query does it fall back to the query as words inside a lemma ("shepherd" in
"German shepherd") and, at a lower weight, inside a class's WordNet gloss (timm's).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

import numpy as np

TABLE = "imagenet_wordnet.tsv"


@dataclass(frozen=True)
class ClassMatch:
    index: int
    name: str
    weight: float  # 1.0 for a lemma match (the class's own or a hypernym's), less for a gloss-only match


@dataclass(frozen=True)
class WordNetTable:
    names: list[str]  # each class's first lemma, lower case
    lemmas: list[list[tuple[str, ...]]]  # each class's own and hypernym lemmas, as words
    by_lemma: dict[tuple[str, ...], list[int]]  # lemma words -> classes that have the lemma
    plurals: dict[str, list[str]]  # WordNet's irregular noun plurals -> singulars


def _words(text: str) -> tuple[str, ...]:
    return tuple(re.findall(r"[a-z0-9]+", text.lower()))


@lru_cache(maxsize=1)
def wordnet_table() -> WordNetTable:
    """The committed table, parsed once."""
    text = resources.files("bgminer").joinpath("data", TABLE).read_text(encoding="utf-8")
    names: list[str] = []
    lemmas: list[list[tuple[str, ...]]] = []
    by_lemma: dict[tuple[str, ...], list[int]] = {}
    plurals: dict[str, list[str]] = {}
    for line in text.splitlines():
        kind, *fields = line.split("\t")
        if kind == "class":
            index, _wnid, own, broader = fields
            assert int(index) == len(names), f"{TABLE} rows out of class order at {index}"
            words = [w for w in (_words(x) for x in own.split("|") + broader.split("|")) if w]
            names.append(own.split("|")[0].lower())
            lemmas.append(words)
            for w in dict.fromkeys(words):
                by_lemma.setdefault(w, []).append(int(index))
        elif kind == "plural":
            plurals[fields[0]] = fields[1].split("|")
    return WordNetTable(names, lemmas, by_lemma, plurals)


def _singulars(word: str) -> list[str]:
    """Every regular singular a plural ``word`` may have ("boxes" -> "boxe", "box"; "ponies" -> "pony", "ponie")."""
    out = []
    if len(word) > 3 and word.endswith("ies"):
        out.append(word[:-3] + "y")
    if len(word) > 2 and word.endswith("s") and not word.endswith(("ss", "us", "is")):
        out.append(word[:-1])
    if len(word) > 3 and word.endswith("es") and (word[-3] in "sxzo" or word.endswith(("ches", "shes"))):
        out.append(word[:-2])
    return out


@lru_cache(maxsize=65536)
def _forms(word: str) -> frozenset[str]:
    """``word`` and every singular it may be the plural of (for the fuzzy fallback)."""
    return frozenset((word, *_singulars(word), *wordnet_table().plurals.get(word, ())))


def _exact(q_words: tuple[str, ...], table: WordNetTable) -> set[int]:
    """Classes with a lemma equal to the query: as typed, else with the last word singular
    (regular endings first, then WordNet's irregular plurals: "geese" -> "goose")."""
    if q_words in table.by_lemma:
        return set(table.by_lemma[q_words])
    head, last = q_words[:-1], q_words[-1]
    for singulars in (_singulars(last), table.plurals.get(last, [])):
        found = {i for s in singulars for i in table.by_lemma.get((*head, s), ())}
        if found:
            return found
    return set()


def _contains(words: tuple[str, ...], phrase: list[frozenset[str]]) -> bool:
    """Whether ``phrase`` (each word as its set of forms) occurs in ``words`` as consecutive whole words."""
    n = len(phrase)
    return any(all(_forms(words[i + k]) & phrase[k] for k in range(n)) for i in range(len(words) - n + 1))


@lru_cache(maxsize=1)
def _glosses() -> list[tuple[str, ...]]:
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    return [_words(info.index_to_description(i, detailed=True).partition(": ")[2]) for i in range(info.num_classes())]


def match_classes(query: str, gloss_weight: float = 0.3) -> list[ClassMatch]:
    """ImageNet classes whose own or hypernym lemmas match ``query``, in class order.

    Falls back to the query's words inside a lemma (weight 1.0) or inside a gloss
    (``gloss_weight``) only when no lemma equals the query.
    """
    q_words = _words(query)
    if not q_words:
        return []
    table = wordnet_table()
    weights = dict.fromkeys(sorted(_exact(q_words, table)), 1.0)
    if not weights:
        phrase = [_forms(w) for w in q_words]
        for i, lemmas in enumerate(table.lemmas):
            if any(_contains(lemma, phrase) for lemma in lemmas):
                weights[i] = 1.0
        glosses = _glosses()
        for i in range(len(table.names)):
            if i not in weights and _contains(glosses[i], phrase):
                weights[i] = gloss_weight
    return [ClassMatch(i, table.names[i], w) for i, w in sorted(weights.items())]


@lru_cache(maxsize=256)
def name_classes(name: str) -> tuple[ClassMatch, ...]:
    """The ImageNet classes a category's name denotes: the lemma matches of the whole name, else of
    its words from the last (the head noun) back ("rare_bird" -> bird, "cat photos" -> cat).
    Gloss-only matches are left out: a prior must mean what the name says. Empty when nothing matches."""
    words = _words(name)
    for query in dict.fromkeys((" ".join(words), *reversed(words))):
        matches = tuple(m for m in match_classes(query) if m.weight >= 1.0)
        if matches:
            return matches
    return ()


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax of ``logits`` [N, 1000] as float32, in torch (multi-threaded): review queries
    run it over every scanned row (here, and in :func:`bgminer.explore.hellinger`)."""
    import torch

    with torch.inference_mode():
        return torch.softmax(torch.from_numpy(np.asarray(logits)).float(), dim=1).numpy()


def class_probability(logits: np.ndarray, matches: list[ClassMatch]) -> np.ndarray:
    """Weighted softmax mass on the matched classes, per row of ``logits`` [N, 1000]."""
    idx = np.array([m.index for m in matches], dtype=np.int64)
    w = np.array([m.weight for m in matches], dtype=np.float32)
    return softmax(logits)[:, idx] @ w
