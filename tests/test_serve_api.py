"""`sjea serve`'s JSON API on a real store of Fashion-MNIST PNGs: every endpoint against the library,
every bad input as a 4xx with one message, no file outside the store served, the store reloaded when
replaced, concurrent clients on one loaded copy, and the command itself in a subprocess."""

from __future__ import annotations

import io
import os
import re
import shutil
import struct
import subprocess
import sys
import threading
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from sjea_tools.search import search_store  # noqa: E402
from sjea_tools.serve import create_app, serve_in_thread  # noqa: E402
from sjea_tools.store import open_store  # noqa: E402

N = 200


@pytest.fixture(scope="module")
def store(tmp_path_factory, fmnist_test):
    from conftest import indexed_store

    return indexed_store(tmp_path_factory.mktemp("serve"), fmnist_test, N)


@pytest.fixture(scope="module")
def client(store):
    with TestClient(create_app(store["out"])) as c:
        yield c


def one_error(r, status: int) -> str:
    """The response is `status` with exactly {"error": one line}, never a traceback."""
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert list(body) == ["error"], body
    msg = body["error"]
    assert isinstance(msg, str) and msg and "\n" not in msg and "Traceback" not in msg
    return msg


def png_bytes(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def png_claiming_size(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height: a decompression bomb as far as any decoder knows."""
    data = bytearray(png_bytes(np.zeros((1, 1), np.uint8)))
    ihdr = data.index(b"IHDR")
    data[ihdr + 4:ihdr + 12] = struct.pack(">II", width, height)
    data[ihdr + 17:ihdr + 21] = struct.pack(">I", zlib.crc32(bytes(data[ihdr:ihdr + 17])))
    return bytes(data)


# --- every endpoint ---------------------------------------------------------------------------------

def test_info_describes_the_store(client, store):
    info = client.get("/api/info").json()
    with open_store(store["out"]) as s:
        assert (info["n"], info["levels"], info["dims"], info["model_id"]) == (s.n, s.levels, s.dims, s.model_id)
    assert info["index_kinds"] == {"0": "flat", "1": "flat"}
    assert info["cluster_tree"] is True and info["image_search"] is True and info["loads"] == 1


@pytest.mark.parametrize("mode", ["per-level", "hierarchical", "both"])
def test_search_by_id_is_the_library_result(client, store, mode):
    got = client.get("/api/search", params={"id": 17, "k": 6, "mode": mode}).json()
    want = search_store(store["out"], ids=[17], k=6, mode=mode)
    for key, value in want.items():  # every field of `sjea search --json`, the same values
        if key != "results":
            assert got[key] == value, key
    for g, w in zip(got["results"], want["results"], strict=True):
        assert {k: g[k] for k in w} == w
        assert set(g) - set(w) <= {"cluster_path"}  # the page shows the query's cluster in every mode


def test_search_by_a_list_of_ids_finds_each_first(client, store):
    ids = [0, 58, 199]
    res = client.get("/api/search", params={"id": ids, "k": 3, "mode": "both"}).json()
    assert [r["query_id"] for r in res["results"]] == ids
    for i, r in zip(ids, res["results"]):
        assert r["hierarchical"][0]["id"] == i and r["per_level"]["0"][0]["id"] == i
        assert r["query_file"] == str(store["images"] / store["paths"][i])


def test_uploaded_image_finds_its_own_file_first_at_every_level(client, store, tmp_path, monkeypatch):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # this test's own temp folder: other workers upload too
    rel = store["paths"][42]
    data = (store["images"] / rel).read_bytes()
    res = client.post("/api/search/image", files={"file": ("mine.png", data, "image/png")},
                      data={"k": "5", "mode": "both"}).json()
    r = res["results"][0]
    assert r["query"] == "upload:mine.png" and r["query_file"] is None
    for lv in ("0", "1"):
        assert r["per_level"][lv][0]["path"] == rel and r["per_level"][lv][0]["score"] >= 0.999
    assert r["hierarchical"][0]["path"] == rel
    assert r["cluster_path"] == client.get("/api/items/42").json()["cluster_path"]
    assert not list(tmp_path.glob("sjea-serve-*"))  # the upload's temp file is gone


def test_min_score_leaves_out_lower_hits(client):
    full = client.get("/api/search", params={"id": 5, "k": 20, "mode": "per-level"}).json()["results"][0]
    cut = sorted(h["score"] for h in full["per_level"]["0"])[10]
    got = client.get("/api/search", params={"id": 5, "k": 20, "mode": "per-level", "min_score": cut}).json()
    kept = got["results"][0]["per_level"]["0"]
    assert kept == [h for h in full["per_level"]["0"] if h["score"] >= cut] and len(kept) == 10


def test_item_metadata_and_thumbnail_are_the_stored_file(client, store, fmnist_test):
    item = client.get("/api/items/7").json()
    assert item["path"] == store["paths"][7] and item["label"] == Path(store["paths"][7]).parent.name
    assert len(item["cluster_path"]) == 2
    r = client.get("/api/items/7/thumbnail", params={"size": 64})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    thumb = np.asarray(Image.open(io.BytesIO(r.content)).convert("RGB"))
    original = np.asarray(Image.open(store["images"] / store["paths"][7]).convert("RGB"))
    assert np.array_equal(thumb, original)  # 28x28 fits in 64x64: not resized
    small = Image.open(io.BytesIO(client.get("/api/items/7/thumbnail", params={"size": 16}).content))
    assert max(small.size) == 16


def test_cluster_tree_nodes_partition_the_store(client, store):
    roots = client.get("/api/clusters").json()
    assert sum(c["size"] for c in roots["clusters"]) == N
    top = roots["clusters"][0]
    node = client.get(f"/api/clusters/0/{top['id']}", params={"limit": 500}).json()
    assert node["total"] == top["size"] == len(node["members"])
    assert sum(c["size"] for c in node["sub_clusters"]) == top["size"]
    for i in node["members"][:10]:
        assert client.get(f"/api/items/{i}").json()["cluster_path"][0] == top["id"]
    sub = node["sub_clusters"][0]
    leaf = client.get(f"/api/clusters/1/{sub['id']}").json()
    assert leaf["path"] == [top["id"], sub["id"]] and leaf["parent"] == top["id"] and leaf["sub_clusters"] == []
    page = client.get(f"/api/clusters/0/{top['id']}", params={"offset": 2, "limit": 3}).json()
    assert page["members"] == node["members"][2:5]


def test_page_and_its_files_are_served_by_the_package(client):
    page = client.get("/")
    assert page.status_code == 200 and "/static/app.js" in page.text
    for name in ("app.js", "style.css"):
        assert client.get(f"/static/{name}").status_code == 200
    assert not re.search(r"(src|href)=\"https?://", page.text)  # no CDN
    schema = client.get("/openapi.json").json()
    assert {"/api/search", "/api/search/image", "/api/items/{item_id}", "/api/items/{item_id}/thumbnail",
            "/api/clusters", "/api/clusters/{depth}/{node}", "/api/info"} <= set(schema["paths"])


# --- bad input: 4xx with one message -----------------------------------------------------------------

@pytest.mark.parametrize("url,status", [
    ("/api/items/999999", 404),                         # unknown id
    ("/api/items/-1", 404),
    ("/api/items/..%2F..%2Fetc%2Fpasswd", 404),         # path-like ids
    ("/api/items/%2Fetc%2Fpasswd/thumbnail", 404),
    ("/api/items/..%2Femb.h5/thumbnail", 404),
    ("/api/items/1e3", 404),
    ("/api/search?id=..%2F..%2Fetc%2Fpasswd", 422),
    ("/api/search?id=999999", 404),
    ("/api/search?id=1&k=0", 422),                      # k=0
    ("/api/search?id=1&k=-3", 422),
    ("/api/search?id=1&mode=sideways", 422),
    ("/api/search?id=1&mode=hierarchical&level=0", 400),
    ("/api/search?id=1&mode=per-level&level=7", 400),
    ("/api/search?id=1&mode=hierarchical&order=0,5", 400),
    ("/api/search?id=1&mode=per-level&order=1,0", 400),
    ("/api/search?id=1&min_score=2", 400),
    ("/api/search?id=1&min_score=nan", 400),
    ("/api/search?id=1&mode=hierarchical&margin=3", 422),  # soft gate margin outside 0..2
    ("/api/search?id=1&mode=hierarchical&margin=-1", 422),
    ("/api/search", 422),                               # nothing to search for
    ("/api/items/3/thumbnail?size=100000", 422),
    ("/api/clusters/9/0", 404),
    ("/api/clusters/0/9999", 404),
    ("/etc/passwd", 404),
    ("/static/../../../../etc/passwd", 404),
])
def test_bad_get_requests_get_one_message(client, url, status):
    msg = one_error(client.get(url), status)
    assert "root:" not in msg  # nothing of /etc/passwd


@pytest.mark.parametrize("method,url", [("POST", "/api/search"), ("GET", "/api/search/image"),
                                        ("DELETE", "/api/items/1"), ("PUT", "/api/clusters"),
                                        ("POST", "/api/info")])
def test_wrong_method_is_405(client, method, url):
    assert method in one_error(client.request(method, url, content=b"x"), 405)


def test_not_an_image_is_400(client):
    r = client.post("/api/search/image", files={"file": ("notes.png", b"just text, not a png", "image/png")})
    assert "not an image" in one_error(r, 400)
    one_error(client.post("/api/search/image", files={"file": ("empty.png", b"", "image/png")}), 400)
    one_error(client.post("/api/search/image", data={"k": "3"}), 422)  # no file at all


def test_decompression_bomb_is_400_before_decoding(client):
    bomb = png_claiming_size(60_000, 60_000)  # 3.6 gigapixels in ~70 bytes
    assert len(bomb) < 200
    msg = one_error(client.post("/api/search/image", files={"file": ("bomb.png", bomb, "image/png")}), 400)
    assert "pixels" in msg


def test_limits_are_the_apps_own(store):
    with TestClient(create_app(store["out"], max_upload_bytes=4000, max_pixels=32 * 32)) as c:
        big = png_bytes(np.random.default_rng(0).integers(0, 255, (40, 40), dtype=np.uint8))  # >4 kB, 1600 px
        assert "larger than the limit" in one_error(
            c.post("/api/search/image", files={"file": ("big.png", big + b"\0" * 70_000, "image/png")}), 413)
        assert "1,600 pixels" in one_error(c.post("/api/search/image", files={"file": ("b.png", big, "image/png")}), 400)
        ok = (store["images"] / store["paths"][0]).read_bytes()  # 28x28 fits
        assert c.post("/api/search/image", files={"file": ("ok.png", ok, "image/png")}).status_code == 200


def test_an_upload_without_content_length_is_refused(client):
    def chunks():
        yield b"--x\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.png\"\r\n\r\n"
        yield b"\0" * 1000 + b"\r\n--x--\r\n"

    r = client.post("/api/search/image", content=chunks(), headers={"content-type": "multipart/form-data; boundary=x"})
    one_error(r, 411)


# --- only files of the store ---------------------------------------------------------------------------

def served_copy(store, tmp_path) -> Path:
    """A copy of the store whose image root is a copy of the images (so tests may tamper with both)."""
    import h5py

    shutil.copytree(store["images"], tmp_path / "imgs")
    out = tmp_path / "emb.h5"
    shutil.copy(store["out"], out)
    shutil.copytree(store["out"].with_name("emb.h5.index"), tmp_path / "emb.h5.index")
    with h5py.File(out, "r+") as f:
        f.attrs["root"] = str(tmp_path / "imgs")
    return out


def test_a_file_outside_the_store_is_never_served(store, tmp_path):
    out = served_copy(store, tmp_path)
    secret = tmp_path / "secret.png"
    Image.fromarray(np.full((8, 8), 77, np.uint8)).save(secret)
    imgs = tmp_path / "imgs"
    (imgs / store["paths"][3]).unlink()
    (imgs / store["paths"][3]).symlink_to(secret)  # a row's file replaced by a symlink out of the root
    (imgs / store["paths"][4]).unlink()
    (imgs / store["paths"][4]).symlink_to("/etc/passwd")
    (imgs / store["paths"][6]).unlink()  # a row whose file is gone
    with TestClient(create_app(out)) as c:
        for i in (3, 4):
            assert "outside the store's image root" in one_error(c.get(f"/api/items/{i}/thumbnail"), 403)
        one_error(c.get("/api/items/6/thumbnail"), 404)
        assert c.get("/api/items/7/thumbnail").status_code == 200


def test_row_paths_edited_to_leave_the_root_are_refused(store, tmp_path):
    import h5py

    from sjea_tools.serve.media import Forbidden, item_file

    out = served_copy(store, tmp_path)
    secret = tmp_path / "secret.png"
    Image.fromarray(np.full((8, 8), 77, np.uint8)).save(secret)
    for rel in ("../secret.png", str(secret), "Bag/../../secret.png"):
        with pytest.raises(Forbidden):
            item_file(tmp_path / "imgs", rel, 0)
    with h5py.File(out, "r+") as f:  # the store itself edited: its checksums refuse it as a whole
        f["paths"][4] = "../secret.png"
    with TestClient(create_app(out)) as c:
        r = c.get("/api/items/4/thumbnail")
        assert r.status_code in (403, 409) and r.headers["content-type"] == "application/json"
        one_error(r, r.status_code)


# --- server behaviour ---------------------------------------------------------------------------------

def test_store_replaced_by_an_update_is_reloaded_or_reported_stale(store, tmp_path, fmnist_test):
    from conftest import write_fmnist_folder
    from sjea_tools.pipeline import embed_and_index, index_store

    out = served_copy(store, tmp_path)
    with TestClient(create_app(out)) as c:
        assert c.get("/api/info").json()["n"] == N
        write_fmnist_folder(tmp_path / "imgs", fmnist_test, 30, start=N)
        embed_and_index(tmp_path / "imgs", out, run=store["run"], backend="torch", workers=0, update=True, index=False)
        assert "rebuild it with: sjea index" in one_error(c.get("/api/search", params={"id": 1}), 409)
        index_store(out)
        info = c.get("/api/info").json()
        assert info["n"] == N + 30 and info["loads"] == 2
        res = c.get("/api/search", params={"id": N + 29, "k": 1, "mode": "per-level"}).json()
        assert res["results"][0]["per_level"]["0"][0]["id"] == N + 29


def test_concurrent_clients_share_one_loaded_store(store):
    import httpx

    url, stop = serve_in_thread(store["out"])
    try:
        def client_loop(i: int, out: list) -> None:
            with httpx.Client(base_url=url, timeout=30) as h:
                for j in range(10):
                    qid = (i * 10 + j) % N
                    r = h.get("/api/search", params={"id": qid, "k": 3, "mode": "per-level"})
                    out.append((r.status_code, r.json()["results"][0]["per_level"]["0"][0]["id"] == qid))

        results: list = []
        threads = [threading.Thread(target=client_loop, args=(i, results)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert results == [(200, True)] * 80
        with httpx.Client(base_url=url) as h:
            assert h.get("/api/info").json()["loads"] == 1  # one load for all 80 requests
    finally:
        stop()


def test_sjea_serve_command_serves_and_explains_its_options(store, tmp_path):
    from typer.testing import CliRunner

    from sjea_tools.cli import app

    out = CliRunner().invoke(app, ["serve", "--help"], env={"COLUMNS": "200"}).output
    for option in ("--host", "--port", "--run", "--onnx", "--max-upload-mb", "--max-megapixels", "--log-level",
                   "--allow-host"):
        assert option in out
    bad = CliRunner().invoke(app, ["serve", str(tmp_path / "missing.h5")])
    assert bad.exit_code == 2 and "does not exist" in bad.output
    env = {**os.environ, "COLUMNS": "200"}
    proc = subprocess.Popen([sys.executable, "-c", "from sjea_tools.cli import main; main()", "serve",
                             str(store["out"]), "--port", "0", "--allow-host", "photos.lan"], stderr=subprocess.PIPE,
                            text=True, env=env)
    try:
        line = proc.stderr.readline()
        url = re.search(r"http://127\.0\.0\.1:\d+/", line).group(0)
        import httpx

        assert httpx.get(url + "api/info", timeout=30).json()["n"] == N
        assert httpx.get(url + "api/info", headers={"host": "photos.lan"}, timeout=30).status_code == 200
        assert httpx.get(url + "api/info", headers={"host": "rebound.example"}, timeout=30).status_code == 400
    finally:
        proc.terminate()
        proc.wait(10)


def test_margin_reaches_the_library_soft_gate(client, store):
    got = client.get("/api/search", params={"id": 17, "k": 6, "mode": "hierarchical", "margin": 2}).json()
    want = search_store(store["out"], ids=[17], k=6, mode="hierarchical", margin=2.0)
    assert got["margin"] == 2.0 and got["results"][0]["gate"] == want["results"][0]["gate"]
    assert [h["id"] for h in got["results"][0]["hierarchical"]] == [h["id"] for h in want["results"][0]["hierarchical"]]
    assert got["results"][0]["gate"]["rows"] == want["n"]  # margin 2: every coarse cluster
