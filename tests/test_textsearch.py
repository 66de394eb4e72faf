"""Offline text search: words are matched to ImageNet classes through WordNet (each class's own
lemmas and its hypernyms' lemmas, from the committed table); images are ranked by the
backbone's probability mass on those classes."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from bgminer.textsearch import ClassMatch, class_probability, match_classes, wordnet_table

REPO = Path(__file__).resolve().parent.parent
DOG_BREEDS = range(151, 269)  # ImageNet-1k's dog classes, from "Chihuahua" to "Mexican hairless"
SPORTS_CAR, HOTDOG, DOGSLED = 817, 934, 537
KITE_BIRD, CRANE_BIRD, CRANE_MACHINE = 21, 134, 517


def by_index(matches: list[ClassMatch]) -> dict[int, ClassMatch]:
    return {m.index: m for m in matches}


def names(query: str) -> set[str]:
    return {m.name for m in match_classes(query)}


def test_dog_finds_every_dog_breed_and_nothing_else():
    found = by_index(match_classes("dog"))
    assert set(found) == set(DOG_BREEDS)  # the breeds sit under dog.n.01; "hot dog" and "dogsled" do not
    assert all(found[i].weight == 1.0 for i in DOG_BREEDS)
    assert found[151].name == "chihuahua"
    assert HOTDOG not in found and DOGSLED not in found
    assert [m.index for m in match_classes("hot dog")] == [HOTDOG]


@pytest.mark.parametrize(
    ("query", "members", "non_members"),
    [
        ("furniture", {"desk", "wardrobe", "rocking chair", "studio couch", "four-poster", "bookcase"}, {"hotdog", "laptop"}),
        ("footwear", {"running shoe", "sandal", "clog", "cowboy boot", "loafer"}, {"jersey", "sunglasses", "dog"}),
        ("musical instrument", {"violin", "grand piano", "acoustic guitar", "drum", "harmonica"}, {"radio", "ipod"}),
        ("kitchen utensil", {"frying pan", "wok", "spatula", "teapot"}, {"dining table", "refrigerator"}),
        ("vehicle", {"sports car", "school bus", "canoe", "airliner", "dogsled"}, {"hotdog", "sorrel", "chihuahua"}),
        ("bird", {"ostrich", "bald eagle", "goose", "hummingbird", "kite"}, {"airliner", "bee", "chihuahua"}),
        ("fruit", {"strawberry", "banana", "lemon", "granny smith", "pineapple"}, {"broccoli", "hotdog"}),
        ("animal", {"tench", "chihuahua", "goose", "tiger"}, {"sports car", "hotdog"}),
    ],
)
def test_a_broader_word_finds_the_classes_under_it(query, members, non_members):
    found = names(query)
    assert members <= found
    assert not (non_members & found)


def test_a_word_with_several_senses_finds_each_sense():
    assert {KITE_BIRD, CRANE_BIRD} <= {m.index for m in match_classes("bird")}
    assert CRANE_MACHINE not in {m.index for m in match_classes("bird")}
    assert [m.index for m in match_classes("crane")] == [CRANE_BIRD, CRANE_MACHINE]


def test_the_most_generic_lemmas_match_many_classes():
    assert len(match_classes("entity")) == 1000
    assert 300 < len(match_classes("artifact")) < 1000


@pytest.mark.parametrize(
    ("plural", "singular"),
    [
        ("dogs", "dog"),
        ("kitchen utensils", "kitchen utensil"),
        ("buses", "bus"),
        ("horses", "horse"),
        ("puppies", "puppy"),
        ("geese", "goose"),  # WordNet's irregular plurals, carried in the table
        ("mice", "mouse"),
        ("wolves", "wolf"),
    ],
)
def test_a_plural_matches_like_its_singular(plural, singular):
    assert match_classes(singular)
    assert match_classes(plural) == match_classes(singular)


def test_a_plural_lemma_is_matched_as_written():
    assert names("glasses") == {"sunglasses"}  # "spectacles, eyeglasses, glasses", not drinking glasses


def test_a_multi_word_query_matches_the_phrase_not_each_word():
    matches = match_classes("sports car")
    assert [(m.index, m.name, m.weight) for m in matches] == [(SPORTS_CAR, "sports car", 1.0)]
    assert len(match_classes("car")) > 1  # "car" alone matches many classes; the phrase narrowed it
    assert [m.name for m in match_classes("zebras")] == ["zebra"]


def test_case_punctuation_and_whitespace_do_not_matter():
    assert match_classes("  Sports \t CAR  ") == match_classes("sports car")
    assert match_classes("DOG") == match_classes("dog")
    assert names("T-shirt") == names("t shirt") == {"jersey"}


@pytest.mark.parametrize("query", ["xyzzyqwv", "", "   ", "?!,"])
def test_no_match_returns_an_empty_list(query):
    assert match_classes(query) == []


def test_words_inside_a_lemma_are_a_fallback_when_no_lemma_equals_the_query():
    found = names("shepherd")  # no class or hypernym is just "shepherd"; "German shepherd", "shepherd dog" are
    assert {"german shepherd", "collie", "komondor"} <= found
    assert found <= {wordnet_table().names[i] for i in DOG_BREEDS}


def test_a_gloss_only_match_weighs_less_than_a_name_match():
    matches = match_classes("stripes")  # only the tiger's gloss mentions stripes
    assert [(m.name, m.weight) for m in matches] == [("tiger", 0.3)]
    assert [m.weight for m in match_classes("stripes", gloss_weight=0.5)] == [0.5]


def test_matches_come_in_class_order_without_duplicates():
    for query in ("dog", "vehicle", "entity", "shepherd"):
        indexes = [m.index for m in match_classes(query)]
        assert indexes == sorted(set(indexes))


def test_the_table_follows_the_classifier_class_order():
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    rows = [line.split("\t") for line in (REPO / "bgminer/data/imagenet_wordnet.tsv").read_text().splitlines()]
    classes = [r for r in rows if r[0] == "class"]
    assert [int(r[1]) for r in classes] == list(range(1000))
    assert [r[2] for r in classes] == list(info.label_names())  # the wnid of logit i
    table = wordnet_table()
    assert table.names == [info.index_to_description(i).split(",")[0].lower() for i in range(1000)]


def _build_script():
    spec = importlib.util.spec_from_file_location("build_wordnet_table", REPO / "scripts/build_wordnet_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_build_script_follows_hypernyms_and_instance_hypernyms(tmp_path):
    # A three-level slice of WordNet in data.noun's own format (wndb(5WN)), plus one noun.exc line.
    (tmp_path / "data.noun").write_text(
        "  1 This software and database is being provided to you, the LICENSEE, by\n"
        "00000001 03 n 01 entity 0 001 ~ 00000002 n 0000 | that which exists\n"
        "00000002 05 n 02 dog 0 domestic_dog 0 002 @ 00000001 n 0000 ~ 00000003 n 0000 | a dog\n"
        "00000003 05 n 02 toy_dog 0 Dog 1 001 @ 00000002 n 0000 | a small dog\n"
        "00000004 05 n 01 Lassie 0 001 @i 00000003 n 0000 | a famous dog\n"
    )
    (tmp_path / "noun.exc").write_text("dogs dog\ngeese goose\n")
    text = _build_script().build(["n00000003", "n00000004"], tmp_path)
    rows = [line.split("\t") for line in text.splitlines() if not line.startswith("#")]
    assert rows == [
        ["class", "0", "n00000003", "toy dog|Dog", "domestic dog|entity"],  # "dog" once, as the class's own lemma
        ["class", "1", "n00000004", "Lassie", "toy dog|Dog|domestic dog|entity"],
        ["plural", "dogs", "dog"],  # "goose" is no word of these lemmas
    ]


@pytest.mark.skipif(not Path("/usr/share/wordnet/data.noun").exists(), reason="needs Debian's wordnet-base")
def test_the_committed_table_is_what_the_script_builds():
    assert _build_script().main(["--check"]) == 0


def test_class_probability_is_the_weighted_softmax_mass_on_the_matched_classes():
    logits = np.log(np.array([[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]], dtype=np.float32)) + 7.0  # a shift changes nothing
    matches = [ClassMatch(0, "a", 1.0), ClassMatch(2, "c", 0.5)]
    assert class_probability(logits, matches) == pytest.approx([0.5 + 0.5 * 0.2, 0.1 + 0.5 * 0.8], abs=1e-6)


def test_a_category_name_means_its_wordnet_classes_or_its_head_noun_or_nothing():
    from bgminer.textsearch import name_classes

    birds = {m.index for m in name_classes("bird")}
    assert len(birds) > 50 and {m.index for m in name_classes("rare_bird")} == birds  # the head noun
    assert {m.name for m in name_classes("cat photos")} >= {"tabby", "siamese cat"}  # back from the last word
    assert name_classes("positive") == () and name_classes("") == () and name_classes("class 1") == ()
    assert all(m.weight == 1.0 for m in name_classes("footwear"))  # no gloss-only guesses
