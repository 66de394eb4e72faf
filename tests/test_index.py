"""The vector index: one interface over the exact, IVF-Flat and IVF-PQ backends, their file format and registry."""

from __future__ import annotations

import json
import shutil
import struct
from dataclasses import replace
from pathlib import Path

import faiss
import numpy as np
import pytest

from bgminer.index import (
    BACKENDS,
    EXACT_MAX_FLOATS,
    IVF_MAX_FLOATS,
    ExactIndex,
    IVFConfig,
    IVFIndex,
    IVFPQConfig,
    IVFPQIndex,
    VectorIndex,
    auto_kind,
    build_index,
    exact_knn,
    make_index,
    nlist_for,
    recall_at_k,
    register,
    side_files,
)

FORMAT_V1 = Path(__file__).parent / "data" / "index_v1"  # written by bgminer/index.py before it became a package


def clustered(n: int, dim: int = 64, clusters: int = 20, seed: int = 0) -> np.ndarray:
    """Gaussian clusters in an 8-d subspace plus noise, shaped like CNN features."""
    rng = np.random.default_rng(seed)
    basis = rng.standard_normal((8, dim))
    centers = rng.standard_normal((clusters, 8)) * 3
    z = centers[rng.integers(0, clusters, n)] + rng.standard_normal((n, 8))
    return (z @ basis + 0.3 * rng.standard_normal((n, dim))).astype(np.float32)


def ids_for(n: int) -> np.ndarray:
    return np.arange(1000, 1000 + n, dtype=np.int64)  # not row numbers: the index must keep the caller's ids


PQ = IVFPQConfig(nlist=30, reduce_dim=64, pq_bytes=16, rerank_codec="SQfp16")


def config_for(kind: str, tmp_path: Path, **settings) -> IVFConfig | IVFPQConfig | None:
    """Small settings for ``kind``; IVF-PQ keeps its unsaved codes under ``tmp_path``."""
    if kind == "ivf":
        return IVFConfig(**{"reduce_dim": 16, **settings})
    if kind == "ivfpq":
        return replace(PQ, scratch_dir=str(tmp_path / "scratch"), **settings)
    return None


ALL_KINDS = ["exact", "ivf", "ivfpq"]


# -- registry and backend choice -------------------------------------------------------------
def test_auto_kind_goes_exact_then_ivf_then_ivfpq_as_the_corpus_grows():
    assert auto_kind(10_000, 1280) == "exact"
    assert auto_kind(EXACT_MAX_FLOATS // 1280 + 1, 1280) == "ivf"
    assert auto_kind(1_000_000, 1280) == "ivf"
    assert auto_kind(IVF_MAX_FLOATS // 1280 + 1, 1280) == "ivfpq"  # where a float16 copy would pass 4 GB
    assert build_index(clustered(100), ids_for(100)).kind == "exact"


def test_the_registry_maps_each_kind_to_its_backend_and_config():
    assert {kind: (cls, cls.config_class) for kind, cls in BACKENDS.items()} == {
        "exact": (ExactIndex, None),
        "ivf": (IVFIndex, IVFConfig),
        "ivfpq": (IVFPQIndex, IVFPQConfig),
    }
    index = make_index("ivf", 32, IVFConfig(nlist=7))
    assert isinstance(index, IVFIndex) and index.config.nlist == 7
    assert make_index("ivfpq", 32, IVFConfig(nlist=7)).config == IVFPQConfig()  # another backend's config is not applied
    with pytest.raises(ValueError, match="unknown index kind 'hnsw'; use 'exact', 'ivf', 'ivfpq' or 'auto'"):
        make_index("hnsw", 32)
    with pytest.raises(ValueError, match="already registered"):
        register(type("Twin", (ExactIndex,), {}))


def test_nlist_rule_is_four_sqrt_n_capped_by_training_points():
    assert nlist_for(1_000_000) == 4000
    assert nlist_for(10_000) == 256  # 4*sqrt = 400, but only 10_000 / 39 = 256 lists get 39 points each


# -- search -----------------------------------------------------------------------------------
def test_exact_search_returns_cosine_similarities_best_first_under_caller_ids():
    x = clustered(500)
    index = build_index(x, ids_for(500), kind="exact")
    similarities, ids = index.search(x[:3] * 7.0, 5)  # query scale does not matter: cosine
    assert ids[:, 0].tolist() == ids_for(500)[:3].tolist()
    np.testing.assert_allclose(similarities[:, 0], 1.0, atol=1e-5)
    assert (np.diff(similarities, axis=1) <= 1e-6).all()


@pytest.mark.parametrize("kind", ["ivf", "ivfpq"])
def test_ivf_backends_at_full_nprobe_return_the_exact_top_results(tmp_path, kind):
    data = clustered(3020)
    x, queries = data[:3000], data[3000:]
    exact = build_index(x, ids_for(3000), kind="exact")
    settings = {"nlist": 30, "nprobe": 30} | ({"reduce_dim": None} if kind == "ivf" else {})
    index = build_index(x, ids_for(3000), kind=kind, config=config_for(kind, tmp_path, **settings))
    exact_similarities, exact_ids = exact.search(queries, 10)
    similarities, ids = index.search(queries, 10)
    # the rerank copy is float16: near-ties may swap, so compare the float32 similarities of what was returned
    unit_queries = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    recomputed = np.einsum("qkd,qd->qk", exact.vectors(ids.ravel()).reshape(20, 10, -1), unit_queries)
    np.testing.assert_allclose(recomputed, exact_similarities, atol=2e-3)
    np.testing.assert_allclose(similarities, exact_similarities, atol=2e-3)
    assert recall_at_k(ids, exact_ids) >= 0.98


def test_ivf_with_pca_and_tuned_nprobe_reaches_target_recall():
    data = clustered(6100, dim=128)
    x, queries = data[:6000], data[6000:]  # queries from the same distribution, not in the index
    index = build_index(x, ids_for(6000), kind="ivf", config=IVFConfig(reduce_dim=32, target_recall=0.95))
    assert isinstance(index, IVFIndex) and index.nprobe < index.nlist
    _, true_ids = exact_knn(queries, [(x, ids_for(6000))], 10)
    _, found = index.search(queries, 10)
    assert recall_at_k(found, true_ids) >= 0.9


@pytest.mark.parametrize("kind", ["ivf", "ivfpq"])
def test_add_after_build_finds_new_vectors_without_retraining(tmp_path, kind):
    index = build_index(clustered(2000), ids_for(2000), kind=kind, config=config_for(kind, tmp_path))
    nlist, nprobe = index.nlist, index.nprobe
    centroids = faiss.extract_index_ivf(index._probe).quantizer.reconstruct_n(0, nlist)
    new = clustered(30, seed=5) + 5.0  # new points away from the old ones
    new_ids = np.arange(50_000, 50_030, dtype=np.int64)
    index.add(new, new_ids)
    assert len(index) == 2030 and (index.nlist, index.nprobe) == (nlist, nprobe)
    np.testing.assert_array_equal(faiss.extract_index_ivf(index._probe).quantizer.reconstruct_n(0, nlist), centroids)
    similarities, ids = index.search(new, 1)
    assert ids[:, 0].tolist() == new_ids.tolist()
    np.testing.assert_allclose(similarities[:, 0], 1.0, atol=2e-3)


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_excluded_ids_are_never_returned(tmp_path, kind):
    x = clustered(1000)
    index = build_index(x, ids_for(1000), kind=kind, config=config_for(kind, tmp_path))
    _, first = index.search(x[:5], 10)
    excluded = np.unique(first)
    _, ids = index.search(x[:5], 10, exclude_ids=excluded)
    assert not np.isin(ids, excluded).any()
    assert (ids >= 0).all()


@pytest.mark.parametrize("kind", ["exact", "ivf"])
def test_missing_results_are_padded_with_minus_one_and_minus_inf(kind):
    x = clustered(50)
    index = build_index(x, ids_for(50), kind=kind, config=IVFConfig(nlist=2, nprobe=2, reduce_dim=None))
    similarities, ids = index.search(x[:2], 60)
    assert (ids[:, :50] >= 0).all() and (ids[:, 50:] == -1).all()
    assert np.isneginf(similarities[:, 50:]).all()


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_removed_ids_disappear(tmp_path, kind):
    x = clustered(1000)
    index = build_index(x, ids_for(1000), kind=kind, config=config_for(kind, tmp_path))
    gone = ids_for(1000)[:10]
    assert index.remove(np.r_[gone, [-5]]) == 10  # unknown ids are ignored
    assert len(index) == 990
    _, ids = index.search(x[:10], 5)
    assert not np.isin(ids, gone).any()


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_adding_an_existing_id_is_refused(tmp_path, kind):
    x = clustered(1000)
    index = build_index(x, ids_for(1000), kind=kind, config=config_for(kind, tmp_path))
    with pytest.raises(ValueError, match="already in the index"):
        index.add(x[:1], ids_for(1000)[-1:])


def test_vectors_returns_unit_norm_copies_and_rejects_unknown_ids():
    x = clustered(100)
    index = ExactIndex(64)
    index.add(x, ids_for(100))
    v = index.vectors(ids_for(100)[[3, 7]])
    np.testing.assert_allclose(v, x[[3, 7]] / np.linalg.norm(x[[3, 7]], axis=1, keepdims=True), atol=1e-6)
    with pytest.raises(KeyError):
        index.vectors([1])


def test_build_reads_float16_memmaps_in_chunks(tmp_path):
    x = clustered(700)
    path = tmp_path / "features.npy"
    np.save(path, x.astype(np.float16))
    index = build_index(np.load(path, mmap_mode="r"), ids_for(700), kind="exact")
    _, ids = index.search(x[:4], 1)
    assert ids[:, 0].tolist() == ids_for(700)[:4].tolist()


# -- files ------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["exact", "ivf"])
def test_save_load_round_trip_gives_the_same_answers(tmp_path, kind):
    x = clustered(1500)
    index = build_index(x, ids_for(1500), kind=kind, config=IVFConfig(reduce_dim=16))
    path = tmp_path / "index.bin"
    index.save(path)
    index.save(path)  # overwriting goes through a temporary file and a rename
    assert [p.name for p in tmp_path.iterdir()] == ["index.bin"]
    loaded = VectorIndex.load(path)
    assert type(loaded) is type(index) and len(loaded) == len(index)
    np.testing.assert_array_equal(loaded.ids(), index.ids())
    excluded = ids_for(3)
    for a, b in zip(loaded.search(x[:10], 8, exclude_ids=excluded), index.search(x[:10], 8, exclude_ids=excluded), strict=True):
        np.testing.assert_array_equal(a, b)
    if isinstance(index, IVFIndex):
        assert (loaded.nprobe, loaded.nlist, loaded.config) == (index.nprobe, index.nlist, index.config)


def test_ivfpq_saves_its_codes_beside_the_file_and_keeps_adding_after_load(tmp_path):
    x = clustered(1500)
    index = build_index(x, ids_for(1500), kind="ivfpq", config=config_for("ivfpq", tmp_path))
    path = tmp_path / "index" / "v0001.faiss"
    path.parent.mkdir()
    index.save(path)
    assert list((tmp_path / "scratch").iterdir()) == []  # the codes moved next to the index
    assert side_files(path) == list(path.parent.glob("v0001.faiss.*.codes"))
    loaded = VectorIndex.load(path)
    np.testing.assert_array_equal(loaded.search(x[:10], 8)[1], index.search(x[:10], 8)[1])
    loaded.add(clustered(3, seed=9) + 5.0, [1, 2, 3])
    loaded.save(path)
    again = VectorIndex.load(path)
    assert len(again) == 1503 and again.search(clustered(3, seed=9) + 5.0, 1)[1].ravel().tolist() == [1, 2, 3]
    assert len(list(path.parent.glob("v0001.faiss.*.codes"))) == 1
    np.testing.assert_allclose(again.vectors([1003]), index.vectors([1003]))


def read_header(path: Path) -> tuple[bytes, dict]:
    raw = path.read_bytes()
    (size,) = struct.unpack("<I", raw[8:12])
    return raw[:8], json.loads(raw[12 : 12 + size])


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_files_written_before_the_index_became_a_package_still_load(tmp_path, kind):
    shutil.copytree(FORMAT_V1, tmp_path / "v1")  # a copy: adding to a loaded IVF-PQ index writes to its codes file
    expected = np.load(tmp_path / "v1" / "expected.npz")
    index = VectorIndex.load(tmp_path / "v1" / f"{kind}.faiss")
    assert index.kind == kind and len(index) == 295  # 300 indexed, 5 removed before saving
    assert index.describe() == str(expected[f"{kind}_describe"])
    similarities, ids = index.search(expected["queries"], 5)
    np.testing.assert_array_equal(ids, expected[f"{kind}_ids"])
    np.testing.assert_allclose(similarities, expected[f"{kind}_scores"], atol=1e-6)  # key of the v1 fixture file


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_new_files_keep_the_v1_header(tmp_path, kind):
    magic, old = read_header(FORMAT_V1 / f"{kind}.faiss")
    settings = old.get("config")
    if kind == "ivfpq":
        settings = settings | {"scratch_dir": str(tmp_path)}
    config = None if settings is None else BACKENDS[kind].config_class(**settings)
    index = build_index(np.load(FORMAT_V1 / "expected.npz")["vectors"], np.arange(300), kind=kind, config=config)
    index.save(tmp_path / "new.faiss")
    new_magic, new = read_header(tmp_path / "new.faiss")
    assert magic == new_magic == b"BGMVIDX1"
    assert list(new) == list(old) and new.get("config") == settings  # the same settings, in the same order
    assert (new["kind"], new["dim"]) == (kind, 16)
