"""Centring (issue: readable scores): each level's mean representation, fixed at the end of
training, carried by model.pt, the ONNX metadata and the store; stores and queries hold rows minus
that mean, L2-normalised, so a random pair scores near 0 and an image against itself 1."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from conftest import make_run, write_fmnist_folder
from sjea_tools.embed import Embedder
from sjea_tools.errors import SjeaError
from sjea_tools.runs import load_model, model_id
from sjea_tools.store import check_same_identity, open_store
from sjea_tools.vectors import centre_and_normalize, l2_normalize

# torch and ONNX Runtime rows of the same images, both centred with the same float32 means: within
# the export verification's 1e-4 absolute (measured: 2e-6 on 1,000 images with this tiny model; the
# centred rows are shorter before normalising, so a graph difference grows by raw/centred norm).
BACKEND_ATOL = 1e-4


def test_centre_and_normalize_alone():
    rng = np.random.default_rng(0)
    x = rng.normal(3.0, 1.0, (200, 16)).astype(np.float32)  # a shared component: raw cosines near 0.9
    centre = x.mean(0)
    out = centre_and_normalize(x, centre)
    assert out.dtype == np.float32 and out.flags.c_contiguous
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1, atol=1e-6)
    np.testing.assert_allclose(out, l2_normalize(x - centre), atol=1e-7)
    raw = l2_normalize(x)
    off = ~np.eye(200, dtype=bool)
    assert np.median((raw @ raw.T)[off]) > 0.8
    assert abs(np.median((out @ out.T)[off])) < 0.05
    np.testing.assert_array_equal(centre_and_normalize(x, None), raw)
    with pytest.raises(ValueError):
        centre_and_normalize(x, centre[:5])


def test_centres_are_the_level_means_saved_with_the_model_and_leave_the_forward_pass_raw(tmp_path, fmnist_test):
    from sjea_tools.data.preprocess import normalize_pixels
    from sjea_tools.trainers.centring import level_centring

    run = make_run(tmp_path / "old", levels=2)
    model = load_model(run)
    assert model.centres is None  # a model.pt from before centring loads, "not centred"
    pixels = fmnist_test.pixels[:300]
    x = normalize_pixels(torch.from_numpy(pixels), model.preprocess_spec)
    with torch.no_grad():
        before = model.forward_levels(x)
    centres = level_centring(model, pixels, batch_size=64)[0]
    for c, y in zip(centres, before):
        np.testing.assert_allclose(c.numpy(), y.double().mean(0).numpy(), atol=1e-5)
    # A seeded sample when capped: the same sample twice, another than the first rows'.
    capped = level_centring(model, pixels, limit=100, seed=3)[0]
    np.testing.assert_array_equal(capped[0].numpy(), level_centring(model, pixels, limit=100, seed=3)[0][0].numpy())
    assert not np.allclose(capped[0].numpy(), level_centring(model, pixels[:100])[0][0].numpy())
    model.set_centres(centres)
    with torch.no_grad():
        after = model.forward_levels(x)
    for a, b in zip(before, after):  # level 1 still reads level 0's raw output
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    from sjea_tools.runs import save_model

    save_model(tmp_path / "new", model, model.cfg)
    (tmp_path / "new" / "config.json").write_text((run / "config.json").read_text())
    loaded = load_model(tmp_path / "new")
    for a, b in zip(loaded.centres, centres):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(ValueError):
        model.set_centres(centres[:1])


def test_a_centred_store_scores_a_random_pair_near_0_and_an_image_itself_1(tmp_path, fmnist_test, monkeypatch):
    from sjea_tools.pipeline import embed_and_index
    from sjea_tools.search import search_store
    from sjea_tools.store.verify import verify_store

    run = make_run(tmp_path / "runs" / "c", centred=True)
    images = write_fmnist_folder(tmp_path / "imgs", fmnist_test, 150)
    out = tmp_path / "emb.h5"
    assert embed_and_index(images, out, run=run, backend="torch", workers=0)["centred"] is True
    model = load_model(run)
    with open_store(out) as s:
        assert s.centres is not None
        for k, c in zip(s.levels, s.centres):
            np.testing.assert_array_equal(c, model.centres[k].numpy())
        rows = [s.read_embeddings(k, np.arange(s.n)) for k in s.levels]
    off = ~np.eye(len(rows[0]), dtype=bool)
    for y in rows:
        assert abs(float(np.median((y @ y.T)[off]))) < 0.15
    # Without centring the same images score far above 0: the raw floor the centring removes.
    raw = Embedder.from_source(run=run, backend="torch")
    raw.centres = None
    plain = raw.embed_files(sorted(images.rglob("*.png")))[0]
    assert float(np.median((plain @ plain.T)[off])) > 0.3
    res = search_store(out, queries=[images / rel for rel in sorted(p.relative_to(images) for p in
                                                                       images.rglob("*.png"))[:3]],
                       k=3, mode="per-level")
    assert res["metric"] == "centred cosine" and not any("uncentred" in n for n in res["notes"])
    for r in res["results"]:
        for hits in r["per_level"].values():
            assert hits[0]["score"] == pytest.approx(1.0, abs=1e-5)
            assert hits[1]["score"] < 0.999
    by_id = search_store(out, ids=[7], k=2, mode="per-level")["results"][0]["per_level"]
    assert all(h[0]["id"] == 7 and h[0]["score"] == pytest.approx(1.0, abs=1e-5) for h in by_id.values())
    assert verify_store(out)["centred"] is True
    # The same through `sjea search --json` and `sjea serve` (an uploaded file).
    import tempfile

    from fastapi.testclient import TestClient
    from typer.testing import CliRunner

    from sjea_tools.cli import app
    from sjea_tools.serve import create_app

    with open_store(out) as s:
        rel = s.paths[11]
    done = CliRunner().invoke(app, ["search", str(images / rel), "--store", str(out), "--k", "2", "--json"])
    assert done.exit_code == 0, done.output
    got = json.loads(done.stdout)
    assert got["metric"] == "centred cosine"
    for hits in got["results"][0]["per_level"].values():
        assert hits[0]["path"] == rel and hits[0]["score"] == pytest.approx(1.0, abs=1e-5) and hits[1]["score"] < 0.999
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    with TestClient(create_app(out)) as client:
        up = client.post("/api/search/image", files={"file": ("q.png", (images / rel).read_bytes(), "image/png")},
                         data={"k": "2", "mode": "per-level"}).json()
    assert up["metric"] == "centred cosine"
    for hits in up["results"][0]["per_level"].values():
        assert hits[0]["path"] == rel and hits[0]["score"] == pytest.approx(1.0, abs=1e-5)
    from sjea_tools.duplicates import DEFAULT_PIXEL_THRESHOLD, DEFAULT_THRESHOLD, UNCENTRED_THRESHOLD, default_thresholds

    assert default_thresholds(out) == (DEFAULT_THRESHOLD, DEFAULT_PIXEL_THRESHOLD)
    assert DEFAULT_THRESHOLD < UNCENTRED_THRESHOLD


def test_torch_and_onnx_embedders_give_the_same_centred_rows_and_the_graph_stays_raw(tmp_path, fmnist_test):
    from sjea_tools.exports.onnx import export_levels
    from sjea_tools.exports.runtime import OnnxModel
    from sjea_tools.data.preprocess import normalize_array

    run = make_run(tmp_path / "run", centred=True)
    model = load_model(run)
    pixels = fmnist_test.pixels[:64]
    t = Embedder.from_source(run=run, backend="torch")
    o = Embedder.from_source(run=run, backend="onnx")
    assert t.centred and o.centred and o.backend == "onnx"
    for a, b, c_t, c_o in zip(t.embed_pixels(pixels), o.embed_pixels(pixels), t.centres, o.centres):
        np.testing.assert_array_equal(c_t, c_o)  # the metadata carries the float32 means exactly
        np.testing.assert_allclose(a, b, atol=BACKEND_ATOL)
        assert float((a * b).sum(1).min()) > 0.99999
    # The exported graph's outputs are the raw representations; the means sit in its metadata.
    path = export_levels(model, tmp_path / "all.onnx", [0, 1])
    om = OnnxModel(path, provider="cpu")
    assert json.loads(om.session.get_modelmeta().custom_metadata_map["centres"])[1][:3] == \
        [float(v) for v in model.centres[1][:3]]
    x = normalize_array(pixels, model.preprocess_spec)
    with torch.no_grad():
        ref = model.forward_levels(torch.from_numpy(x))
    for got, want in zip(om.run(x), ref):
        np.testing.assert_allclose(got, want.numpy(), atol=1e-4)
    # A one-level file cut from the full graph (sjea export --level all) carries its own level's mean.
    from sjea_tools.exports.onnx import build_onnx, extract_levels

    sub = extract_levels(build_onnx(model, [0, 1], single_level=False), [1])
    meta = {p.key: p.value for p in sub.metadata_props}
    assert json.loads(meta["centres"]) == [[float(v) for v in model.centres[1]]]
    # An export of the projector outputs has no means to carry.
    emb_path = export_levels(model, tmp_path / "emb.onnx", [0], output="embedding")
    assert OnnxModel(emb_path, provider="cpu").centres is None


def test_an_old_store_keeps_working_uncentred_and_says_so(tmp_path, fmnist_test):
    from sjea_tools.pipeline import embed_and_index
    from sjea_tools.search import search_store
    from sjea_tools.store.verify import verify_store

    run = make_run(tmp_path / "runs" / "old")  # trained before centring: no means
    images = write_fmnist_folder(tmp_path / "imgs", fmnist_test, 60)
    out = tmp_path / "old.h5"
    assert embed_and_index(images, out, run=run, backend="torch", workers=0)["centred"] is False
    with open_store(out) as s:
        assert s.centres is None and not any(k.startswith("centre_") for k in s.attrs)
    res = search_store(out, ids=[3], k=2, mode="per-level")
    assert res["metric"] == "cosine"
    assert any("uncentred" in n and "embed again" in n for n in res["notes"])
    assert all(h[0]["score"] == pytest.approx(1.0, abs=1e-5) for h in res["results"][0]["per_level"].values())
    assert verify_store(out)["centred"] is False
    from sjea_tools.duplicates import UNCENTRED_THRESHOLD, default_thresholds

    assert default_thresholds(out)[0] == UNCENTRED_THRESHOLD


def test_update_keeps_the_means_and_rows_centred_otherwise_are_refused(tmp_path, fmnist_test):
    from sjea_tools.pipeline import embed_and_index

    run = make_run(tmp_path / "runs" / "c", centred=True)
    images = write_fmnist_folder(tmp_path / "imgs", fmnist_test, 40)
    out = tmp_path / "emb.h5"
    embed_and_index(images, out, run=run, backend="torch", workers=0)
    with open_store(out) as s:
        first = s.centres
    write_fmnist_folder(images, fmnist_test, 20, start=40)
    embed_and_index(images, out, update=True, backend="torch", workers=0)
    with open_store(out) as s:
        assert s.n == 60 and s.segments is not None
        for a, b in zip(first, s.centres):
            np.testing.assert_array_equal(a, b)
        attrs = dict(s.attrs)
        rows, paths = s.read_embeddings(0, np.arange(s.n)), s.paths
    # Old and appended rows are in one space: each image embedded again scores 1 with its row.
    again = Embedder.from_source(run=run, backend="torch").embed_files([images / p for p in paths])[0]
    np.testing.assert_allclose((rows * again).sum(1), 1, atol=1e-5)
    # Rows centred otherwise never join: one line.
    other = {**attrs, "centre_0": [v + 1 for v in attrs["centre_0"]]}
    with pytest.raises(SjeaError, match="other means"):
        check_same_identity(attrs, other, "x.h5", "write a new file.")
    bare = {k: v for k, v in attrs.items() if not k.startswith("centre_")}
    with pytest.raises(SjeaError, match="holds uncentred rows, this run writes centred rows"):
        check_same_identity(attrs, bare, "x.h5", "write a new file.")


def test_centre_run_adds_the_means_to_an_older_run_as_a_new_model(tmp_path):
    from sjea_tools.trainers.centring import centre_run

    run = make_run(tmp_path / "old")
    before = model_id(run / "model.pt")
    path = centre_run(run, tmp_path / "centred", limit=500)
    assert model_id(run / "model.pt") == before and load_model(run).centres is None  # the source is only read
    assert model_id(path) != before
    model = load_model(tmp_path / "centred")
    assert model.centres is not None and [len(c) for c in model.centres] == model.level_dims
    with pytest.raises(SjeaError, match="already exists"):
        centre_run(run, tmp_path / "centred")
    shutil.rmtree(tmp_path / "centred")


def test_store_evaluation_centres_its_random_init_floor_by_its_own_means(tmp_path, fmnist_test):
    from sjea_tools.evaluation.store import store_embedders
    from sjea_tools.pipeline import embed_and_index

    run = make_run(tmp_path / "runs" / "c", centred=True)
    images = write_fmnist_folder(tmp_path / "imgs", fmnist_test, 30)
    out = tmp_path / "emb.h5"
    embed_and_index(images, out, run=run, backend="torch", workers=0, index=False)
    with open_store(out) as s:
        emb, rand, _ = store_embedders(s, "cpu", 0, fmnist_test.pixels[:64], True)
    assert emb.centred and rand.centred  # the floor is treated as the stored rows are
    assert not np.allclose(rand.centres[0], emb.centres[0])  # ... with the random network's own means
    y = rand.embed_pixels(fmnist_test.pixels[:64])[0]
    assert abs(float(np.median((y @ y.T)[~np.eye(64, dtype=bool)]))) < 0.15
