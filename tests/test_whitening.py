"""Whitening (issue: readable scores): each level's ZCA matrix, fixed with the means at the end of
training, carried by model.pt and the ONNX metadata; a store records its sha256. Rows are centred,
whitened, L2-normalised: a few dominant directions no longer crowd every neighbour near 1."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from conftest import make_run, write_fmnist_folder
from sjea_tools.cli import app
from sjea_tools.embed import Embedder
from sjea_tools.errors import SjeaError
from sjea_tools.runs import load_model
from sjea_tools.store import open_store
from sjea_tools.vectors import centre_and_normalize, l2_normalize, matrix_digest

# torch and ONNX Runtime rows: within the export verification's 1e-4 absolute (the whitening
# multiplies a graph difference by at most sqrt(largest / smallest eigenvalue kept)).
BACKEND_ATOL = 1e-3


def test_zca_whitening_of_a_hand_computed_covariance():
    from sjea_tools.trainers.centring import zca_whitening

    # Variances 4 and 1 along the diagonals: C = R diag(4, 1) R^T, R a 45-degree rotation, so
    # W = R diag(1/2, 1) R^T = [[3/4, -1/4], [-1/4, 3/4]].
    c = torch.tensor([[2.5, 1.5], [1.5, 2.5]], dtype=torch.float64)
    w = zca_whitening(c, eps=0.0)
    assert w.dtype == torch.float32
    torch.testing.assert_close(w, torch.tensor([[0.75, -0.25], [-0.25, 0.75]]), rtol=0, atol=1e-6)
    torch.testing.assert_close(w.double() @ c @ w.double(), torch.eye(2, dtype=torch.float64), rtol=0, atol=1e-6)
    # A direction without variance is floored (eps x the largest), not divided by zero.
    flat = zca_whitening(torch.diag(torch.tensor([4.0, 0.0], dtype=torch.float64)), eps=1e-6)
    assert torch.isfinite(flat).all() and float(flat[1, 1]) == pytest.approx(1 / np.sqrt(4e-6), rel=1e-5)


def test_centre_whiten_and_normalize_is_one_float64_product_rounded_once():
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(300, 8)) @ np.diag([10, 5, 1, 1, 1, 1, 1, 0.5]) + 3).astype(np.float32)
    centre = x.mean(0)
    cov = np.cov((x - centre).T)
    values, vectors = np.linalg.eigh(cov)
    w = ((vectors / np.sqrt(values)) @ vectors.T).astype(np.float32)
    out = centre_and_normalize(x, centre, w)
    np.testing.assert_allclose(out, l2_normalize((x - centre).astype(np.float64) @ w.astype(np.float64)), atol=1e-7)
    # One row alone agrees with itself inside a batch to float32 rounding on any BLAS (BLAS may sum in
    # another order by batch shape; the float64 product keeps that far below float32's step).
    np.testing.assert_allclose(centre_and_normalize(x[5:6], centre, w), out[5:6], rtol=0, atol=2e-7)
    # The dominant direction no longer decides every cosine.
    off = ~np.eye(len(x), dtype=bool)
    centred = centre_and_normalize(x, centre)
    assert np.median((out @ out.T).max(1, where=off, initial=-1)) < np.median((centred @ centred.T).max(1, where=off,
                                                                                                      initial=-1))
    with pytest.raises(ValueError):
        centre_and_normalize(x, centre, w[:4, :4])


def test_a_level_is_whitened_only_with_ten_images_per_dimension(tmp_path, fmnist_test):
    from sjea_tools.trainers.centring import WHITEN_IMAGES_PER_DIM, level_centring

    model = load_model(make_run(tmp_path / "r"))
    assert model.level_dims == [256, 512]
    n = WHITEN_IMAGES_PER_DIM * 256  # enough for level 0 (256 wide), not for level 1 (512)
    means, whitenings = level_centring(model, fmnist_test.pixels[:n])
    assert whitenings[0].shape == (256, 256) and whitenings[1] is None
    # The sample's level-0 rows, centred and whitened, have the identity covariance.
    from sjea_tools.data.preprocess import normalize_pixels

    with torch.no_grad():
        y = model.forward_levels(normalize_pixels(torch.from_numpy(fmnist_test.pixels[:n]), model.preprocess_spec))[0]
    z = (y.double() - means[0].double()) @ whitenings[0].double()
    seen = np.linalg.eigvalsh((z.T @ z / n).numpy())
    # Every direction above the eigenvalue floor ends with variance 1; below it, less (floored).
    values = np.linalg.eigvalsh(np.cov((y.double() - means[0].double()).numpy().T, bias=True))
    from sjea_tools.trainers.centring import WHITEN_EPS

    np.testing.assert_allclose(np.sort(seen), np.sort(values / (np.clip(values, 0, None) + WHITEN_EPS * values.max())),
                               atol=2e-3)
    assert int(((seen > 0.99) & (seen < 1.01)).sum()) >= 64


def test_a_whitened_model_round_trips_and_its_store_scores_self_1_random_near_0(tmp_path, fmnist_test):
    from sjea_tools.pipeline import embed_and_index
    from sjea_tools.search import search_store
    from sjea_tools.store.verify import verify_store

    run = make_run(tmp_path / "runs" / "w", whitened=True)
    model = load_model(run)
    assert model.whitenings is not None and all(w is not None for w in model.whitenings)
    images = write_fmnist_folder(tmp_path / "imgs", fmnist_test, 150)
    out = tmp_path / "emb.h5"
    assert embed_and_index(images, out, run=run, backend="torch", workers=0)["centred"] is True
    with open_store(out) as s:
        assert s.whitening_digests == [matrix_digest(w.numpy()) for w in model.whitenings]
        assert s.attrs["whitening_1_sha256"] == matrix_digest(model.whitenings[1].numpy())
        rows = [s.read_embeddings(k, np.arange(s.n)) for k in s.levels]
        rels = list(s.paths)
    off = ~np.eye(len(rows[0]), dtype=bool)
    centred_only = Embedder.from_source(run=run, backend="torch")
    centred_only.whitenings = None
    plain = centred_only.embed_files([images / r for r in rels])
    for y, c in zip(rows, plain):
        assert abs(float(np.median((y @ y.T)[off]))) < 0.15
        # Whitening spreads the best other image's score below what centring alone gives.
        best = lambda v: float(np.median(np.where(off, v @ v.T, -1).max(1)))  # noqa: E731
        assert best(y) < best(c) - 0.05
    done = CliRunner().invoke(app, ["search", str(images / rels[11]), "--store", str(out), "--k", "2", "--json"])
    assert done.exit_code == 0, done.output
    got = json.loads(done.stdout)
    assert got["metric"] == "whitened cosine"
    for hits in got["results"][0]["per_level"].values():
        assert hits[0]["path"] == rels[11] and hits[0]["score"] == pytest.approx(1.0, abs=1e-5)
    by_id = search_store(out, ids=[7], k=2, mode="per-level")["results"][0]["per_level"]
    assert all(h[0]["id"] == 7 and h[0]["score"] == pytest.approx(1.0, abs=1e-5) for h in by_id.values())
    assert verify_store(out)["whitened"] is True
    checked = CliRunner().invoke(app, ["verify", str(out)])
    assert checked.exit_code == 0 and "rows centred and whitened" in checked.output


def test_onnx_carries_the_whitening_exactly_and_a_file_without_it_is_refused_for_a_whitened_store(tmp_path,
                                                                                                 fmnist_test):
    from sjea_tools.exports.onnx import build_onnx, export_levels, extract_levels, set_metadata
    from sjea_tools.exports.runtime import OnnxModel
    from sjea_tools.pipeline import embed_and_index
    from sjea_tools.search import search_store

    run = make_run(tmp_path / "runs" / "w", whitened=True)
    model = load_model(run)
    t = Embedder.from_source(run=run, backend="torch")
    o = Embedder.from_source(run=run, backend="onnx")
    pixels = fmnist_test.pixels[:64]
    for a, b, w_t, w_o in zip(t.embed_pixels(pixels), o.embed_pixels(pixels), t.whitenings, o.whitenings):
        np.testing.assert_array_equal(w_t, w_o)  # base64 float32: exact
        np.testing.assert_allclose(a, b, atol=BACKEND_ATOL)
    sub = extract_levels(build_onnx(model, [0, 1], single_level=False), [1])
    meta = {p.key: p.value for p in sub.metadata_props}
    assert len(json.loads(meta["whitening"])) == 1
    # A store of the whitened model, searched with an ONNX file of it whose metadata lost the
    # whitening (an export from before whitening): one line, not scores in another space.
    images = write_fmnist_folder(tmp_path / "imgs", fmnist_test, 40)
    out = tmp_path / "emb.h5"
    embed_and_index(images, out, run=run, backend="torch", workers=0)
    path = export_levels(model, tmp_path / "all.onnx", [0, 1])
    import onnx

    proto = onnx.load(str(path))
    meta = {p.key: p.value for p in proto.metadata_props}
    meta.pop("whitening")
    set_metadata(proto, meta)
    onnx.save(proto, str(tmp_path / "old.onnx"))
    emb = Embedder.from_source(onnx=tmp_path / "old.onnx")
    assert emb.whitenings is None
    with open_store(out) as s, pytest.raises(SjeaError, match="whitened with another matrix"):
        emb.in_space_of(s)
    # Unreadable whitening metadata: one line naming the fix.
    meta["whitening"] = json.dumps([{"shape": [3, 3], "dtype": "<f4", "base64": "AAAA"}, None])
    set_metadata(proto, meta)
    onnx.save(proto, str(tmp_path / "bad.onnx"))
    with pytest.raises(SjeaError, match="unreadable whitening.*export it again"):
        OnnxModel(tmp_path / "bad.onnx", provider="cpu")
    assert search_store(out, ids=[3], k=2, mode="per-level")["metric"] == "whitened cosine"


def test_no_whiten_stores_centred_rows_and_update_keeps_them_centred(tmp_path, fmnist_test):
    from sjea_tools.search import search_store

    run = make_run(tmp_path / "runs" / "w", whitened=True)
    images = write_fmnist_folder(tmp_path / "imgs", fmnist_test, 40)
    out = tmp_path / "centred.h5"
    done = CliRunner().invoke(app, ["embed", str(images), str(out), "--run", str(run), "--no-whiten", "--workers", "0",
                                    "--json"])
    assert done.exit_code == 0, done.output
    assert json.loads(done.stdout)["whitened"] is False
    with open_store(out) as s:
        assert s.centres is not None and s.whitening_digests is None
        rows = s.read_embeddings(0, np.arange(s.n))
        rels = list(s.paths)
    want = Embedder.from_source(run=run, backend="torch").without_whitening().embed_files([images / r for r in rels])[0]
    np.testing.assert_allclose(rows, want, atol=BACKEND_ATOL)
    res = search_store(out, queries=[images / rels[5]], k=2, mode="per-level")
    assert res["metric"] == "centred cosine"
    assert all(h[0]["path"] == rels[5] and h[0]["score"] == pytest.approx(1.0, abs=1e-5)
               for h in res["results"][0]["per_level"].values())
    # --update with the store's own model keeps its rows centred only; rows whitened otherwise are refused.
    write_fmnist_folder(tmp_path / "more", fmnist_test, 3)
    for p in (tmp_path / "more").rglob("*.png"):
        (images / p.parent.name).mkdir(exist_ok=True)
        p.rename(images / p.parent.name / f"extra-{p.name}")
    updated = CliRunner().invoke(app, ["embed", str(images), str(out), "--update", "--workers", "0", "--json"])
    assert updated.exit_code == 0, updated.output
    with open_store(out) as s:
        assert s.whitening_digests is None and s.n > len(rels)
    refused = CliRunner().invoke(app, ["embed", str(images), str(out), "--update", "--run", str(run), "--workers", "0"])
    assert refused.exit_code != 0 and "whitened differently" in refused.output
