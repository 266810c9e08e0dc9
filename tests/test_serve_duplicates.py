"""GET /api/duplicates on a real store of real colour photos with real copies of one of them (a
JPEG re-encode at quality 60 and a 2x enlargement): the groups `sjea duplicates` finds, with ids
the page can show; computed once per (store version, level, threshold); bad input one message;
stores over the row limit refused; the CSV is byte for byte the command's --list; nothing deleted."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from conftest import make_run  # noqa: E402
from photo_folder import make_photo_folder  # noqa: E402
from sjea_tools.duplicates import UNCENTRED_THRESHOLD  # noqa: E402 - the default of these (uncentred) stores
from sjea_tools.serve import duplicates_route  # noqa: E402
from sjea_tools.serve.app import create_app  # noqa: E402
from test_serve_api import one_error  # noqa: E402

ORIGINAL = "cat/cat_000.jpg"
COPIES = ("cat/cat_000-q60.jpg", "cat/cat_000-2x.png")
KEPT = "cat/cat_000-2x.png"  # the most pixels (the keep rule)


def store_with_copies(root: Path) -> dict:
    """12 photos (2 crops of each of 6 skimage scenes) and two copies of one, embedded, indexed and
    clustered by a random-init 2-level run. At the default threshold, level 0 groups exactly the
    photo and its copies (measured: cosines 0.99998 and 0.99972; the nearest other pair 0.9935)."""
    from PIL import Image

    from sjea_tools.pipeline import embed_and_index
    from sjea_tools.store import open_store

    images = make_photo_folder(root / "photos", per_class=2, broken=False)["root"]
    with Image.open(images / ORIGINAL) as im:
        im.save(images / COPIES[0], quality=60)
        im.resize((im.width * 2, im.height * 2), Image.LANCZOS).save(images / COPIES[1])
    out = root / "photos.h5"
    embed_and_index(images, out, run=make_run(root / "runs" / "tiny", levels=2), backend="torch", workers=0)
    with open_store(out) as s:
        paths = list(s.paths)
    return {"images": images, "out": out, "paths": paths}


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    return store_with_copies(tmp_path_factory.mktemp("serve-dups"))


@pytest.fixture
def counted(monkeypatch):
    """find_duplicates, counting its calls (the route imports it from the library at call time)."""
    import sjea_tools.duplicates as lib

    calls = []
    real = lib.find_duplicates

    def counting(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(lib, "find_duplicates", counting)
    return calls


def folder_state(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*")
            if p.is_file()}


def test_groups_name_the_copies_with_ids_that_serve_their_files(made):
    from sjea_tools.duplicates import find_duplicates

    images, paths = made["images"], made["paths"]
    before = folder_state(images)
    client = TestClient(create_app(made["out"]))
    got = client.get("/api/duplicates").json()
    assert got["level"] == 0 and got["rows"] == len(paths) == 14 and got["max_rows"] == 50_000
    assert [[m["path"] for m in g["members"]] for g in got["groups"]] == [
        [KEPT, ORIGINAL, COPIES[0]]]  # the kept file first, the others by cosine to it
    group = got["groups"][0]
    assert [m["action"] for m in group["members"]] == ["keep", "remove", "remove"]
    assert got["to_remove"] == 2 and got["pairs"] >= 2 and got["keep_rule"]
    for m in group["members"]:
        assert paths[m["id"]] == m["path"]
        assert client.get(m["original"]).content == (images / m["path"]).read_bytes()
        assert client.get(m["thumbnail"]).headers["content-type"] == "image/png"
    lib = find_duplicates(made["out"], level=0)  # what `sjea duplicates STORE` reports
    assert got["threshold"] == lib["threshold"] and got["pairs"] == lib["pairs"]
    assert [[(m["row"], m["score"]) for m in g["members"]] for g in lib["groups"]] == \
        [[(m["id"], m["score"]) for m in g["members"]] for g in got["groups"]]
    assert folder_state(images) == before  # read-only


def test_no_duplicates_is_an_empty_list_not_an_error(made):
    got = TestClient(create_app(made["out"])).get("/api/duplicates", params={"threshold": 1}).json()
    assert got["threshold"] == 1.0 and got["groups"] == [] and got["to_remove"] == 0


def test_computed_once_per_store_version_level_and_threshold(made, counted):
    client = TestClient(create_app(made["out"]))
    first = client.get("/api/duplicates").json()
    assert client.get("/api/duplicates").json() == first
    assert client.get("/api/duplicates", params={"threshold": UNCENTRED_THRESHOLD, "level": "0"}).json() == first  # the default
    assert client.get("/api/duplicates", params={"format": "csv"}).status_code == 200
    assert len(counted) == 1
    client.get("/api/duplicates", params={"level": 1})
    client.get("/api/duplicates", params={"threshold": 0.99})
    client.get("/api/duplicates", params={"level": 1})
    assert len(counted) == 3
    # a new version of the store (what `sjea embed --update` does) is searched again
    st = os.stat(made["out"])
    os.utime(made["out"], ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert client.get("/api/duplicates").json()["groups"] == first["groups"]
    assert len(counted) == 4


def test_a_result_read_while_the_store_changed_is_not_cached(made, monkeypatch):
    import sjea_tools.duplicates as lib

    calls, real = [], lib.find_duplicates

    def replaced_during_search(*args, **kwargs):
        calls.append(1)
        st = os.stat(made["out"])
        os.utime(made["out"], ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
        return real(*args, **kwargs)

    monkeypatch.setattr(lib, "find_duplicates", replaced_during_search)
    client = TestClient(create_app(made["out"]))
    client.get("/api/duplicates")
    client.get("/api/duplicates")
    assert len(calls) == 2


@pytest.mark.parametrize("params, status, needle", [
    ({"threshold": 0}, 400, "threshold must be a number in (0, 1]"),
    ({"threshold": 1.5}, 400, "threshold must be a number in (0, 1]"),
    ({"threshold": "nan"}, 400, "threshold must be a number in (0, 1]"),
    ({"threshold": "abc"}, 422, "threshold: Input should be a valid number"),
    ({"level": "all"}, 400, "level takes one level (levels here: 0, 1)"),
    ({"level": 7}, 400, "level 7 does not exist"),
    ({"format": "xml"}, 422, "format: Input should be 'json' or 'csv'"),
])
def test_bad_input_is_one_message_before_any_search(made, counted, params, status, needle):
    msg = one_error(TestClient(create_app(made["out"])).get("/api/duplicates", params=params), status)
    assert needle in msg and "--" not in msg  # the API's parameter names, not the command's options
    assert counted == []


def test_a_store_over_the_row_limit_is_refused_with_the_command_to_run(made, counted, monkeypatch):
    monkeypatch.setattr(duplicates_route, "MAX_DUPLICATE_ROWS", 13)
    msg = one_error(TestClient(create_app(made["out"])).get("/api/duplicates"), 400)
    assert msg == (f"14 rows are more than the page searches for duplicates (13, about a minute); "
                   f"run: sjea duplicates {made['out']} --list keep.csv")
    assert counted == []
    monkeypatch.setattr(duplicates_route, "MAX_DUPLICATE_ROWS", 14)
    assert TestClient(create_app(made["out"])).get("/api/duplicates").status_code == 200


def test_csv_is_the_commands_keep_remove_list(made, tmp_path):
    from sjea_tools.cli import app

    result = CliRunner().invoke(app, ["duplicates", str(made["out"]), "--threshold", "0.99",
                                      "--list", str(tmp_path / "keep.csv")])
    assert result.exit_code == 0, result.output
    r = TestClient(create_app(made["out"])).get("/api/duplicates", params={"threshold": 0.99, "format": "csv"})
    assert r.status_code == 200 and r.headers["content-type"] == "text/csv; charset=utf-8"
    assert r.headers["content-disposition"] == "attachment; filename*=UTF-8''photos-duplicates-level0.csv"
    assert r.content == (tmp_path / "keep.csv").read_bytes()
    assert r.text.splitlines()[0] == "group,path,action,score" and f"0,{KEPT},keep," in r.text
