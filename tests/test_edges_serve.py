"""`sjea serve` at its edges (issue 22): ids in ASCII digits only, the Host header checked (DNS
rebinding), HEAD answered like GET, a --run model that does not load refused at start, a segment
deleted while serving answered 409, no server temp path in any message, the docs' Python example
run as written, and 16 concurrent worst-case uploads within 1 GB of extra RSS."""

from __future__ import annotations

import io
import re
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
import httpx  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

from sjea_tools.errors import SjeaError  # noqa: E402
from sjea_tools.serve import create_app, serve_in_thread  # noqa: E402
from sjea_tools.serve.app import allowed_host_values  # noqa: E402

from test_serve_api import one_error  # noqa: E402  (the one check of a 4xx body)

N = 60
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def store(tmp_path_factory, fmnist_test):
    from conftest import indexed_store

    return indexed_store(tmp_path_factory.mktemp("edges"), fmnist_test, N)


@pytest.fixture(scope="module")
def client(store):
    with TestClient(create_app(store["out"])) as c:
        yield c




# --- ids ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text", ["%C2%B2", "%D9%A3", "%EF%BC%93", "%E2%91%A0", "1%C2%B2"])  # ² ٣ ３ ① 1²
def test_ids_are_ascii_digits_only(client, text):
    one_error(client.get(f"/api/items/{text}"), 404)
    one_error(client.get(f"/api/items/{text}/thumbnail"), 404)
    one_error(client.get(f"/api/search?id={text}"), 422)


def test_ascii_ids_still_work(client):
    assert client.get("/api/items/3").json()["id"] == 3
    assert client.get("/api/items/3/thumbnail").status_code == 200


# --- methods --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("url", ["/api/info", "/api/items/2", "/api/items/2/thumbnail", "/", "/api/clusters"])
def test_head_is_answered_like_get(client, url):
    got, head = client.get(url), client.head(url)
    assert head.status_code == got.status_code == 200
    assert head.content == b"" and head.headers["content-type"] == got.headers["content-type"]


def test_post_search_without_a_body_is_the_documented_405(client, store):
    assert "POST" in one_error(client.post("/api/search"), 405)  # httpx sends Content-Length: 0
    url, stop = serve_in_thread(store["out"])
    host = url.split("/")[2]
    try:  # as `curl -X POST` sends it: no Content-Length, no body
        with socket.create_connection(tuple(host.rsplit(":", 1)), timeout=30) as sock:
            sock.sendall(f"POST /api/search HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
            reply = b""
            while chunk := sock.recv(65536):
                reply += chunk
    finally:
        stop()
    assert reply.startswith(b"HTTP/1.1 405"), reply[:200]
    assert "`POST /api/search`, with or without a body" in (ROOT / "docs/serve.md").read_text()


# --- the Host header (DNS rebinding) -----------------------------------------------------------------------

def test_allowed_hosts_are_the_bound_address_and_loopback_with_the_port():
    ok = allowed_host_values("127.0.0.1", 8123, ["photos.lan"])
    assert {"127.0.0.1:8123", "localhost:8123", "[::1]:8123", "photos.lan"} <= set(ok)
    assert "127.0.0.1:80" not in ok and "evil.example:8123" not in ok


def test_a_foreign_host_header_is_400_on_a_real_server(store):
    url, stop = serve_in_thread(store["out"], allow_hosts=["photos.lan"])
    port = int(url.rstrip("/").rsplit(":", 1)[1])
    try:
        with httpx.Client(base_url=url, timeout=30) as h:
            assert h.get("/api/info").status_code == 200  # 127.0.0.1:PORT
            for host in (f"localhost:{port}", "photos.lan", f"photos.lan:{port}"):
                assert h.get("/api/info", headers={"host": host}).status_code == 200, host
            for host in (f"evil.example:{port}", "evil.example", f"127.0.0.1:{port + 1}", "", f"localhost.evil:{port}"):
                assert "does not answer for host" in one_error(h.get("/api/info", headers={"host": host}), 400)
    finally:
        stop()


# --- start-up and store changes ------------------------------------------------------------------------

def test_serve_run_with_an_unreadable_checkpoint_refuses_to_start(store, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(store["run"], run)
    for ckpt in run.rglob("*.pt"):
        ckpt.write_bytes(b"not a checkpoint")
    with pytest.raises(SjeaError) as e:
        serve_in_thread(store["out"], run=run)
    assert "--run" in str(e.value) and "\n" not in str(e.value)
    proc = subprocess.run([sys.executable, "-c", "from sjea_tools.cli import main; main()", "serve",
                           str(store["out"]), "--port", "0", "--run", str(run)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr and "--run" in proc.stderr


def test_a_segment_deleted_while_serving_keeps_answering_the_loaded_version(store, tmp_path, fmnist_test):
    """The server holds each store version's vectors, paths and indexes in memory (docs/serve.md):
    a segment file deleted under it changes nothing it answers from; the next load of the store
    (a new version on disk) is refused with 409 by the store's own checks."""
    from conftest import write_fmnist_folder
    from sjea_tools.pipeline import embed_and_index

    images = tmp_path / "imgs"
    shutil.copytree(store["images"], images)
    out = tmp_path / "emb.h5"
    embed_and_index(images, out, run=store["run"], backend="torch", workers=0)
    write_fmnist_folder(images, fmnist_test, 10, start=N)
    embed_and_index(images, out, run=store["run"], backend="torch", workers=0, update=True)
    segments = sorted(out.with_name(out.name + ".segments").iterdir())
    assert segments
    with TestClient(create_app(out)) as c:
        before = c.get("/api/search", params={"id": N + 5, "k": 2, "mode": "per-level"}).json()
        for seg in segments:
            seg.unlink()
        after = c.get("/api/search", params={"id": N + 5, "k": 2, "mode": "per-level"})
        assert after.status_code == 200 and after.json()["results"] == before["results"]
    with TestClient(create_app(out)) as c:  # a fresh load reads the files: refused, one message
        one_error(c.get("/api/search?id=1&k=2"), 409)


# --- upload messages -----------------------------------------------------------------------------------

def test_an_unreadable_upload_names_the_upload_never_a_temp_path(client):
    good = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(good, "PNG")
    data = good.getvalue()
    broken = data[:len(data) // 2]  # a valid header, then the pixel data cut off
    msg = one_error(client.post("/api/search/image", files={"file": ("holiday.png", broken, "image/png")}), 400)
    assert "holiday.png" in msg
    assert tempfile.gettempdir() not in msg and "sjea-serve-" not in msg


def test_embed_files_names_files_by_their_display_name(store, tmp_path):
    from sjea_tools.embed import Embedder

    bad = tmp_path / "x.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    emb = Embedder.from_source(run=store["run"], backend="torch")
    with pytest.raises(SjeaError) as e:
        emb.embed_files([bad], display_names=["upload:cat.png"])
    assert str(e.value).startswith("upload:cat.png is not a readable image") and str(tmp_path) not in str(e.value)


# --- the docs' example ---------------------------------------------------------------------------------

def test_the_docs_python_example_runs_against_a_real_server(store, tmp_path, monkeypatch):
    text = (ROOT / "docs/serve.md").read_text()
    code = re.search(r"From Python.*?```python\n(.*?)```", text, re.S).group(1)
    url, stop = serve_in_thread(store["out"])
    monkeypatch.chdir(tmp_path)
    shutil.copy(store["images"] / store["paths"][7], tmp_path / "query.jpg")
    try:
        scope: dict = {}
        exec(compile(code.replace("http://127.0.0.1:8000/", url), "docs/serve.md", "exec"), scope)
    finally:
        stop()
    assert scope["hits"][0]["id"] == 7 and len(scope["hits"]) == 5
    assert scope["by_level"]["0"][0]["id"] == 7


# --- memory under concurrent worst-case uploads ------------------------------------------------------------

RSS_SCRIPT = r"""
import sys, threading
from pathlib import Path
from fastapi.testclient import TestClient
from sjea_tools.embed.runner import release_freed_buffers_promptly
from sjea_tools.serve import create_app

def status_kb(key):  # VmRSS: now; VmHWM: the peak (what ru_maxrss reports, but resettable)
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(key + ":"))

release_freed_buffers_promptly()  # what make_server does at start-up
big, small = Path(sys.argv[2]).read_bytes(), Path(sys.argv[3]).read_bytes()
with TestClient(create_app(sys.argv[1])) as c:
    assert c.post("/api/search/image", files={"file": ("warm.png", small, "image/png")}).status_code == 200
    # The peak so far (loading the model may export it to ONNX once) is not the uploads': reset it.
    # (ru_maxrss cannot be reset: it also keeps the peak at the exit of any earlier thread.)
    open("/proc/self/clear_refs", "w").write("5")
    base = status_kb("VmRSS")  # the model and the indexes loaded
    codes = []
    def one():
        codes.append(c.post("/api/search/image", files={"file": ("q.png", big, "image/png")}, data={"k": "3"}).status_code)
    threads = [threading.Thread(target=one) for _ in range(16)]
    for t in threads: t.start()
    for t in threads: t.join()
    peak, after = status_kb("VmHWM"), status_kb("VmRSS")
print(len(big), base, peak, after, codes.count(200))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self (Linux) to reset the peak RSS")
def test_16_concurrent_7000x7000_uploads_stay_under_1gb_extra_rss(store, tmp_path):
    # 49 MP (under the 50 MP limit) that compresses to a few MiB (under the 20 MiB limit): each
    # decodes to 147 MB of RGB, 2.4 GB for 16 at once without the decode budget.
    tile = np.random.default_rng(0).integers(0, 255, (100, 100, 3), dtype=np.uint8)
    big, small = tmp_path / "big.png", tmp_path / "small.png"
    Image.fromarray(np.tile(tile, (70, 70, 1))).save(big, compress_level=9)
    Image.fromarray(tile).save(small)
    proc = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(store["out"]), str(big), str(small)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    size, base_kb, peak_kb, after_kb, ok = map(int, proc.stdout.split()[-5:])
    print(f"upload {size / 2**20:.1f} MiB; RSS with the model loaded {base_kb / 2**10:.0f} MiB, peak "
          f"{peak_kb / 2**10:.0f} MiB (+{(peak_kb - base_kb) / 2**10:.0f} MiB), after {after_kb / 2**10:.0f} MiB")
    assert ok == 16
    assert size < 20 << 20
    assert (peak_kb - base_kb) * 1024 < 1 << 30


# --- crafted stores: declared shapes checked before reading ---------------------------------------------

CLI_RSS = r"""
import resource, sys
from sjea_tools.cli import main
try:
    main()
except SystemExit as e:
    code = e.code
print(f"maxrss_kb={resource.getrusage(resource.RUSAGE_SELF).ru_maxrss} code={code}", file=sys.stderr)
"""


def crafted_copy(store, tmp_path, edit) -> Path:
    import h5py

    out = tmp_path / "emb.h5"
    shutil.copy(store["out"], out)
    shutil.copytree(store["out"].with_name("emb.h5.index"), tmp_path / "emb.h5.index")
    with h5py.File(out, "r+") as f:
        edit(f, h5py)
    return out


def huge_paths(f, h5py):
    sha = f["paths"].attrs.get("sha256")
    del f["paths"]
    ds = f.create_dataset("paths", shape=(10**9,), maxshape=(None,), chunks=(65536,), dtype=h5py.string_dtype())
    if sha is not None:
        ds.attrs["sha256"] = sha


def wide_embeddings(f, h5py):
    n = f["level_0/embeddings"].shape[0]
    del f["level_0/embeddings"]
    f["level_0"].create_dataset("embeddings", data=np.ones((n, 100), np.float32))


@pytest.mark.parametrize("edit", [huge_paths, wide_embeddings])
def test_a_crafted_store_is_one_line_and_no_big_allocation(store, tmp_path, edit):
    out = crafted_copy(store, tmp_path, edit)
    assert out.stat().st_size < 50 << 20
    def search(path):
        proc = subprocess.run([sys.executable, "-c", CLI_RSS, "search", "--store", str(path), "--id", "1", "--json"],
                              capture_output=True, text=True, timeout=300)
        stats = re.search(r"maxrss_kb=(\d+) code=(\S+)", proc.stderr)
        assert stats, proc.stderr[-2000:]
        return proc.stderr, int(stats.group(1)), stats.group(2)

    _, genuine_kb, genuine_code = search(store["out"])
    err, kb, code = search(out)
    assert genuine_code in ("0", "None") and code not in ("0", "None"), err[-2000:]
    assert "Traceback" not in err and "AssertionError" not in err and ("damaged" in err or "stale" in err)
    assert kb - genuine_kb < 256 << 10  # KiB: the /paths read alone asked for 7.45 GiB
    with TestClient(create_app(out)) as c:
        for url in ("/api/search?id=1&k=3&mode=per-level", "/api/search?id=1&k=3"):
            assert re.search("damaged|stale", one_error(c.get(url), 409))  # was an AssertionError: 500
        assert c.get("/api/items/1").status_code != 500
    from sjea_tools.store import StoreDamagedError, open_store

    with open_store(out) as s, pytest.raises(StoreDamagedError, match="declares shape|has shape"):
        s.paths if edit is huge_paths else s.read_embeddings(0)
