"""Index choice (pure), building each kind on arrays, recall measurement, memory-mapped loading."""

from __future__ import annotations

import numpy as np
import pytest

from sjea_tools import index as ix
from sjea_tools.errors import SjeaError
from sjea_tools.vectors import exact_rerank, l2_normalize


def clustered(n=3000, d=32, centres=60, seed=0, noise=0.5):
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((centres, d)).astype(np.float32)
    return l2_normalize(c[rng.integers(0, centres, n)] + noise * rng.standard_normal((n, d)).astype(np.float32))


def test_choose_index_grows_from_exact_to_compressed():
    assert ix.choose_index(1_000, 512)["kind"] == "flat"
    assert ix.choose_index(100_000, 512)["kind"] == "hnsw"
    big = ix.choose_index(1_000_000, 512)
    assert big["kind"] == "ivf-flat" and big["params"]["nlist"] == 1024
    pq = ix.choose_index(1_000_000, 512, memory_budget_bytes=1 << 30)
    assert pq["kind"] == "ivf-pq" and 512 % pq["params"]["m"] == 0 and pq["estimated_bytes"] <= 1 << 30
    # a budget too small for the HNSW graph falls back to IVF, not to a bigger index
    assert ix.choose_index(100_000, 512, memory_budget_bytes=210_000_000)["kind"] == "ivf-flat"
    with pytest.raises(SjeaError, match="memory-budget"):
        ix.choose_index(10_000_000, 512, memory_budget_bytes=1 << 20)


def test_choose_index_switches_kind_exactly_at_the_measured_row_limits():
    at = lambda n: ix.choose_index(n, 64, 1 << 33)  # noqa: E731 - a budget that never binds
    assert (at(ix.FLAT_MAX_ROWS)["kind"], at(ix.FLAT_MAX_ROWS + 1)["kind"]) == ("flat", "hnsw")
    assert (at(ix.HNSW_MAX_ROWS)["kind"], at(ix.HNSW_MAX_ROWS + 1)["kind"]) == ("hnsw", "ivf-flat")
    ivf = at(ix.HNSW_MAX_ROWS + 1)
    # IVF lists: power of two nearest sqrt(n) (sqrt(300,001) ~ 548 -> 512), probing 1/64 of them
    assert ivf["params"]["nlist"] == 512 and ivf["search_params"]["nprobe"] == 8
    assert at(ix.FLAT_MAX_ROWS)["estimated_bytes"] == ix.FLAT_MAX_ROWS * 64 * 4


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf-flat", "ivf-pq"])
def test_each_kind_finds_itself_and_reaches_recall(kind, tmp_path):
    x = clustered()
    spec = ix.explicit_spec(kind, len(x), x.shape[1], nlist=32 if kind.startswith("ivf") else None)
    index = ix.build_index(x, spec)
    measured = ix.tune_and_measure(index, x, spec, sample=300)
    floor = 0.8 if kind == "ivf-pq" else 0.95  # PQ is lossy even after exact re-ranking
    assert measured["recall_at_k"] >= floor
    import faiss

    path = tmp_path / "i.faiss"
    faiss.write_index(index, str(path))
    loaded = ix.read_faiss(path, mmap=True)
    ix.set_search_params(loaded, spec["search_params"])
    _, cand = loaded.search(x[:20], 10 * spec["rerank"])  # as search does for k=10: re-scored exactly
    scores, ids = exact_rerank(x[:20], cand, lambda r: x[r], 1)
    assert (ids[:, 0] == np.arange(20)).mean() >= 0.9 and np.median(scores) > 0.999


def test_tuning_raises_nprobe_until_target():
    x = clustered(n=4000, centres=200, noise=1.5)
    spec = ix.explicit_spec("ivf-flat", len(x), x.shape[1], nlist=64)
    spec["search_params"]["nprobe"] = 1
    m = ix.tune_and_measure(ix.build_index(x, spec), x, spec, sample=300)
    assert spec["search_params"]["nprobe"] > 1 and m["recall_at_k"] >= 0.95
    assert [t["nprobe"] for t in m["tried"]] == sorted(t["nprobe"] for t in m["tried"])


def test_recall_at_k_counts_overlap():
    truth = np.array([[1, 2, 3, 4], [5, 6, 7, 8]])
    assert ix.recall_at_k(np.array([[4, 3, 2, 1], [5, 9, 9, 9]]), truth) == pytest.approx((1 + 0.25) / 2)


def test_exact_rerank_orders_by_true_score_and_drops_padding():
    base = l2_normalize(np.eye(4, dtype=np.float32) + 0.1)
    q = base[2:3]
    scores, ids = exact_rerank(q, np.array([[0, -1, 2, 1]]), lambda r: base[r], 3)
    assert ids[0, 0] == 2 and scores[0, 0] == pytest.approx(1.0, abs=1e-6)
    assert -1 not in ids[0]


@pytest.mark.parametrize("text,value", [("8G", 8 << 30), ("512M", 512 << 20), ("2GiB", 2 << 30), ("1000", 1000)])
def test_parse_memory(text, value):
    assert ix.parse_memory(text) == value


def test_parse_memory_rejects_nonsense():
    with pytest.raises(SjeaError, match="not a size"):
        ix.parse_memory("lots")


def test_exact_scores_keep_the_given_order_and_read_each_row_once():
    from sjea_tools.vectors import exact_scores

    base = l2_normalize(np.random.default_rng(0).standard_normal((6, 5)))
    asked = []
    ids = np.array([[4, 1, -1], [1, 4, 0]])
    scores = exact_scores(base[:2], ids, lambda r: asked.append(r.tolist()) or base[r])
    assert asked == [[0, 1, 4]]  # sorted unique ids, one read
    assert scores[0, 0] == pytest.approx(base[0] @ base[4], abs=1e-6) and scores[0, 2] == -np.inf
    assert scores[1, 0] == pytest.approx(1.0, abs=1e-6)


def test_index_build_reports_vectors_added_through_the_progress_protocol():
    x = clustered(n=500)
    spec = ix.explicit_spec("flat", len(x), x.shape[1])
    calls = []
    ix.build_index(x, spec, progress=lambda task, done, total: calls.append((task, done, total)), task="level 0",
                   chunk=200)
    assert calls == [("level 0", 0, 500), ("level 0", 200, 500), ("level 0", 400, 500), ("level 0", 500, 500)]


def test_identity_digest_keys_are_the_stores_identity_with_the_preprocessing_spelled_out():
    from sjea_tools.index.sidecar import IDENTITY_KEYS

    # the keys every sidecar written so far digested: a change would rebuild every existing index
    assert sorted(IDENTITY_KEYS) == sorted(("model_id", "levels", "dims", "image_size", "mean", "std", "colour_mode",
                                            "normalized", "dtype", "root"))
