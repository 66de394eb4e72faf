"""Offline text search: words are matched to ImageNet class names (and their synonyms, broad
groups and glosses); images are ranked by the backbone's probability mass on those classes."""

from __future__ import annotations

import numpy as np
import pytest

from bgminer.textsearch import BROAD_GROUPS, ClassMatch, class_probability, match_classes

DOG_BREEDS = range(151, 269)  # ImageNet-1k's dog classes, from "Chihuahua" to "Mexican hairless"
SPORTS_CAR = 817


def by_index(matches: list[ClassMatch]) -> dict[int, ClassMatch]:
    return {m.index: m for m in matches}


def test_dog_finds_every_dog_breed_at_full_weight():
    found = by_index(match_classes("dog"))
    assert set(DOG_BREEDS) <= set(found)
    assert all(found[i].weight == 1.0 for i in DOG_BREEDS)
    assert found[151].name == "chihuahua"


def test_a_plural_matches_like_its_singular():
    assert match_classes("dogs") == match_classes("dog")
    assert [m.name for m in match_classes("zebras")] == ["zebra"]


def test_a_multi_word_query_matches_the_phrase_not_each_word():
    matches = match_classes("sports car")
    assert [(m.index, m.name, m.weight) for m in matches] == [(SPORTS_CAR, "sports car", 1.0)]
    assert len(match_classes("car")) > 1  # "car" alone matches many classes; the phrase narrowed it


def test_case_and_whitespace_do_not_matter():
    assert match_classes("  Sports \t CAR  ") == match_classes("sports car")
    assert match_classes("DOG") == match_classes("dog")


@pytest.mark.parametrize("query", ["xyzzyqwv", "", "   ", "?!,"])
def test_no_match_returns_an_empty_list(query):
    assert match_classes(query) == []


def test_a_gloss_only_match_weighs_less_than_a_name_match():
    matches = match_classes("stripes")  # only the tiger's gloss mentions stripes
    assert [(m.name, m.weight) for m in matches] == [("tiger", 0.3)]
    assert [m.weight for m in match_classes("stripes", gloss_weight=0.5)] == [0.5]


def test_matches_come_in_class_order_without_duplicates():
    indexes = [m.index for m in match_classes("dog")]
    assert indexes == sorted(set(indexes))


def test_broad_groups_stay_inside_imagenet():
    assert all(0 <= i < 1000 for ranges in BROAD_GROUPS.values() for r in ranges for i in r)


def test_class_probability_is_the_weighted_softmax_mass_on_the_matched_classes():
    logits = np.log(np.array([[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]], dtype=np.float32)) + 7.0  # a shift changes nothing
    matches = [ClassMatch(0, "a", 1.0), ClassMatch(2, "c", 0.5)]
    assert class_probability(logits, matches) == pytest.approx([0.5 + 0.5 * 0.2, 0.1 + 0.5 * 0.8], abs=1e-6)
