from __future__ import annotations

import numpy as np
import pytest

from bgminer.index import (
    EXACT_MAX_FLOATS,
    ExactIndex,
    IVFConfig,
    IVFIndex,
    VectorIndex,
    auto_kind,
    build_index,
    exact_knn,
    nlist_for,
    recall_at_k,
)


def clustered(n: int, dim: int = 64, clusters: int = 20, seed: int = 0) -> np.ndarray:
    """Gaussian clusters in an 8-d subspace plus noise, shaped like CNN features."""
    rng = np.random.default_rng(seed)
    basis = rng.standard_normal((8, dim))
    centers = rng.standard_normal((clusters, 8)) * 3
    z = centers[rng.integers(0, clusters, n)] + rng.standard_normal((n, 8))
    return (z @ basis + 0.3 * rng.standard_normal((n, dim))).astype(np.float32)


def ids_for(n: int) -> np.ndarray:
    return np.arange(1000, 1000 + n, dtype=np.int64)  # not row numbers: the index must keep the caller's ids


def test_auto_kind_is_exact_for_small_corpora_and_ivf_for_large():
    assert auto_kind(10_000, 1280) == "exact"
    assert auto_kind(EXACT_MAX_FLOATS // 1280 + 1, 1280) == "ivf"
    assert build_index(clustered(100), ids_for(100)).kind == "exact"


def test_nlist_rule_is_four_sqrt_n_capped_by_training_points():
    assert nlist_for(1_000_000) == 4000
    assert nlist_for(10_000) == 256  # 4*sqrt = 400, but only 10_000 / 39 = 256 lists get 39 points each


def test_exact_search_returns_cosine_scores_best_first_under_caller_ids():
    x = clustered(500)
    index = build_index(x, ids_for(500), kind="exact")
    scores, ids = index.search(x[:3] * 7.0, 5)  # query scale does not matter: cosine
    assert ids[:, 0].tolist() == ids_for(500)[:3].tolist()
    np.testing.assert_allclose(scores[:, 0], 1.0, atol=1e-5)
    assert (np.diff(scores, axis=1) <= 1e-6).all()


def test_ivf_at_full_nprobe_returns_the_exact_top_results():
    data = clustered(3020)
    x, queries = data[:3000], data[3000:]
    exact = build_index(x, ids_for(3000), kind="exact")
    ivf = build_index(x, ids_for(3000), kind="ivf", config=IVFConfig(nlist=30, nprobe=30, reduce_dim=None))
    exact_scores, exact_ids = exact.search(queries, 10)
    ivf_scores, ivf_ids = ivf.search(queries, 10)
    # the rerank copy is float16: near-ties may swap, so compare the float32 scores of what was returned
    unit_queries = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    rescored = np.einsum("qkd,qd->qk", exact.vectors(ivf_ids.ravel()).reshape(20, 10, -1), unit_queries)
    np.testing.assert_allclose(rescored, exact_scores, atol=2e-3)
    np.testing.assert_allclose(ivf_scores, exact_scores, atol=2e-3)
    assert recall_at_k(ivf_ids, exact_ids) >= 0.98


def test_ivf_with_pca_and_tuned_nprobe_reaches_target_recall():
    data = clustered(6100, dim=128)
    x, queries = data[:6000], data[6000:]  # queries from the same distribution, not in the index
    index = build_index(x, ids_for(6000), kind="ivf", config=IVFConfig(reduce_dim=32, target_recall=0.95))
    assert isinstance(index, IVFIndex) and index.nprobe < index.nlist
    _, true_ids = exact_knn(queries, [(x, ids_for(6000))], 10)
    _, found = index.search(queries, 10)
    assert recall_at_k(found, true_ids) >= 0.9


def test_add_after_build_finds_new_vectors_without_retraining():
    x = clustered(2000)
    index = build_index(x, ids_for(2000), kind="ivf", config=IVFConfig(reduce_dim=16))
    nlist, nprobe = index.nlist, index.nprobe
    new = clustered(30, seed=5) + 5.0  # new points away from the old ones
    new_ids = np.arange(50_000, 50_030, dtype=np.int64)
    index.add(new, new_ids)
    assert len(index) == 2030 and (index.nlist, index.nprobe) == (nlist, nprobe)
    scores, ids = index.search(new, 1)
    assert ids[:, 0].tolist() == new_ids.tolist()
    np.testing.assert_allclose(scores[:, 0], 1.0, atol=2e-3)


@pytest.mark.parametrize("kind", ["exact", "ivf"])
def test_excluded_ids_are_never_returned(kind):
    x = clustered(1000)
    index = build_index(x, ids_for(1000), kind=kind, config=IVFConfig(reduce_dim=16))
    _, first = index.search(x[:5], 10)
    excluded = np.unique(first)
    _, ids = index.search(x[:5], 10, exclude_ids=excluded)
    assert not np.isin(ids, excluded).any()
    assert (ids >= 0).all()


@pytest.mark.parametrize("kind", ["exact", "ivf"])
def test_missing_results_are_padded_with_minus_one_and_minus_inf(kind):
    x = clustered(50)
    index = build_index(x, ids_for(50), kind=kind, config=IVFConfig(nlist=2, nprobe=2, reduce_dim=None))
    scores, ids = index.search(x[:2], 60)
    assert (ids[:, :50] >= 0).all() and (ids[:, 50:] == -1).all()
    assert np.isneginf(scores[:, 50:]).all()


@pytest.mark.parametrize("kind", ["exact", "ivf"])
def test_removed_ids_disappear(kind):
    x = clustered(1000)
    index = build_index(x, ids_for(1000), kind=kind, config=IVFConfig(reduce_dim=16))
    gone = ids_for(1000)[:10]
    assert index.remove(np.r_[gone, [-5]]) == 10  # unknown ids are ignored
    assert len(index) == 990
    _, ids = index.search(x[:10], 5)
    assert not np.isin(ids, gone).any()


def test_adding_an_existing_id_is_refused():
    index = build_index(clustered(100), ids_for(100), kind="exact")
    with pytest.raises(ValueError, match="already in the index"):
        index.add(clustered(1, seed=3), ids_for(1))


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
    for a, b in zip(loaded.search(x[:10], 8, exclude_ids=ids_for(3)), index.search(x[:10], 8, exclude_ids=ids_for(3))):
        np.testing.assert_array_equal(a, b)
    if isinstance(index, IVFIndex):
        assert (loaded.nprobe, loaded.nlist, loaded.config) == (index.nprobe, index.nlist, index.config)


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
