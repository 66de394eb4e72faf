"""Offline text search: match a query to ImageNet class names and synonyms, then rank
images by the pretrained model's probability mass on the matched classes.

No language model is needed (or reachable): the 1000 class lemmas and WordNet glosses
ship with timm, and a few broad groups ("animal", "dog", "bird", ...) are the standard
contiguous ImageNet index ranges.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

# Contiguous ranges of the standard ImageNet-1k class order for common broad words.
BROAD_GROUPS: dict[str, list[range]] = {
    "animal": [range(398)],
    "fish": [range(7), range(389, 398)],
    "bird": [range(7, 25), range(80, 101), range(127, 147)],
    "reptile": [range(33, 69)],
    "amphibian": [range(25, 33)],
    "insect": [range(300, 327)],
    "dog": [range(151, 269)],
    "cat": [range(281, 286)],
    "big cat": [range(286, 294)],
    "monkey": [range(369, 385)],
    "food": [range(923, 970)],
    "fruit": [range(948, 958)],
    "vehicle": [range(407, 409), range(436, 437), range(468, 469), range(511, 512), range(555, 556), range(569, 570),
                range(573, 574), range(575, 576), range(581, 582), range(586, 587), range(609, 610), range(627, 628),
                range(654, 655), range(656, 657), range(661, 662), range(665, 666), range(675, 676), range(717, 718),
                range(734, 735), range(751, 752), range(757, 758), range(779, 780), range(803, 804), range(817, 818),
                range(864, 865), range(866, 867), range(867, 868)],
}


@dataclass(frozen=True)
class ClassMatch:
    index: int
    name: str
    weight: float  # 1.0 for a name/synonym match, less for a gloss-only match


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def _singular(word: str) -> str:
    if len(word) > 3 and word.endswith("ies"):
        return word[:-3] + "y"
    if len(word) > 3 and word.endswith("es") and word[-3] in "sxz":
        return word[:-2]
    if len(word) > 2 and word.endswith("s") and not word.endswith("ss"):
        return word[:-1]
    return word


@lru_cache(maxsize=1)
def _class_text() -> tuple[list[list[str]], list[str]]:
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    synonyms, glosses = [], []
    for i in range(info.num_classes()):
        text = info.index_to_description(i, detailed=True)
        names, _, gloss = text.partition(": ")
        synonyms.append([n.strip().lower() for n in names.split(",")])
        glosses.append(gloss.lower())
    return synonyms, glosses


def match_classes(query: str, gloss_weight: float = 0.3) -> list[ClassMatch]:
    """ImageNet classes whose names, synonyms, broad group or gloss match ``query``."""
    q_words = [_singular(w) for w in _words(query)]
    if not q_words:
        return []
    q_phrase = " ".join(q_words)
    synonyms, glosses = _class_text()
    weights: dict[int, float] = {}
    for group, ranges in BROAD_GROUPS.items():
        if q_phrase == group:
            for r in ranges:
                for i in r:
                    weights[i] = 1.0
    for i, names in enumerate(synonyms):
        for name in names:
            n_words = [_singular(w) for w in _words(name)]
            # whole query as a phrase inside a synonym ("cat" in "tabby cat", "sports car")
            if q_phrase == " ".join(n_words) or _contains(n_words, q_words):
                weights[i] = 1.0
                break
        else:
            g_words = [_singular(w) for w in _words(glosses[i])]
            if _contains(g_words, q_words):
                weights.setdefault(i, gloss_weight)
    names = [s[0] for s in synonyms]
    return [ClassMatch(i, names[i], w) for i, w in sorted(weights.items())]


def _contains(words: list[str], phrase: list[str]) -> bool:
    n = len(phrase)
    return any(words[i : i + n] == phrase for i in range(len(words) - n + 1))


def class_probability(logits: np.ndarray, matches: list[ClassMatch]) -> np.ndarray:
    """Weighted softmax mass on the matched classes, per row of ``logits`` [N, 1000]."""
    z = logits.astype(np.float32)
    z -= z.max(axis=1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(axis=1, keepdims=True)
    idx = np.array([m.index for m in matches], dtype=np.int64)
    w = np.array([m.weight for m in matches], dtype=np.float32)
    return p[:, idx] @ w
