"""`sjea duplicates`: pairs at a threshold (its edge exactly), union-find groups, the kept file, the
pixel check (correlations, unreadable files), and the command on stores of real Fashion-MNIST
images and real colour photos with real JPEG re-encodes, resizes and byte copies."""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from sjea_tools.cli import app
from sjea_tools.duplicates import (DEFAULT_PIXEL_THRESHOLD, DEFAULT_THRESHOLD, UNCENTRED_THRESHOLD, check_threshold,
                                   connected_groups, find_duplicates, keep_index, pair_correlations, pairs_above,
                                   standardised, star_groups, unit_rows)
from sjea_tools.errors import SjeaError

runner = CliRunner()


# --- pure --------------------------------------------------------------------------------------

def test_a_pair_scoring_exactly_the_threshold_is_found_and_one_just_above_is_not():
    # [3, 4] / 5 is [0.6, 0.8] in float32 and its product with [1, 0] is exactly float32(0.6).
    x = np.array([[1, 0], [3, 4], [0, 1]], np.float32)
    score = np.float32(0.6)
    i, j, s = pairs_above(x, float(score))
    assert list(zip(i.tolist(), j.tolist())) == [(0, 1), (1, 2)] and s[0] == score
    i, j, _ = pairs_above(x, float(np.nextafter(score, np.float32(2))))
    assert list(zip(i.tolist(), j.tolist())) == [(1, 2)]  # 0.8 stays, 0.6 is now below


def test_pairs_are_cosines_whatever_the_length_and_a_zero_row_matches_nothing():
    x = np.array([[2, 0, 0], [0.5, 0, 0], [0, 0, 0], [0, 0, 0], [0, 7, 0]], np.float32)
    i, j, s = pairs_above(x, 0.99)
    assert list(zip(i.tolist(), j.tolist())) == [(0, 1)] and s[0] == pytest.approx(1.0, abs=1e-6)


def test_chunked_queries_find_the_same_pairs_as_one_chunk():
    rng = np.random.default_rng(3)
    base = rng.standard_normal((40, 16)).astype(np.float32)
    x = np.concatenate([base, base[:10] + 0.05 * rng.standard_normal((10, 16)).astype(np.float32)])
    whole = pairs_above(x, 0.95)
    chunked = pairs_above(x, 0.95, chunk=7)
    assert len(whole[0]) >= 10  # the planted near-copies are there
    for a, b in zip(whole, chunked):
        np.testing.assert_array_equal(a, b)
    assert set(zip(whole[0].tolist(), whole[1].tolist())) >= {(k, 40 + k) for k in range(10)}


def test_a_threshold_that_pairs_everything_is_refused_before_filling_memory(monkeypatch):
    import sjea_tools.duplicates as dups

    monkeypatch.setattr(dups, "MAX_PAIRS", 10)
    x = np.ones((8, 4), np.float32)  # 28 pairs at any threshold
    with pytest.raises(SjeaError, match="raise --threshold"):
        dups.pairs_above(x, 0.5, chunk=3)
    assert len(dups.pairs_above(x[:5], 0.5)[0]) == 10  # exactly the limit is allowed


def test_union_find_joins_chains_transitively_and_drops_singletons():
    i = np.array([4, 0, 1, 6])
    j = np.array([5, 1, 2, 7])
    groups = connected_groups(9, i, j)
    assert [g.tolist() for g in groups] == [[0, 1, 2], [4, 5], [6, 7]]
    # one more pair (2, 4) merges two groups; the order of the pairs does not matter
    groups = connected_groups(9, np.array([6, 2, 1, 0, 4]), np.array([7, 4, 2, 1, 5]))
    assert [g.tolist() for g in groups] == [[0, 1, 2, 4, 5], [6, 7]]
    assert connected_groups(3, np.zeros(0, np.int64), np.zeros(0, np.int64)) == []


@pytest.mark.parametrize("bad", [0.0, -0.5, 1.0000001, 2.0, float("nan")])
def test_threshold_outside_zero_one_is_refused(bad):
    with pytest.raises(SjeaError, match=r"--threshold must be a number in \(0, 1\]"):
        check_threshold(bad)
    assert check_threshold(1.0) == 1.0 and 0 < DEFAULT_THRESHOLD <= 1


def test_the_kept_file_has_the_most_pixels_then_bytes_then_the_first_path():
    assert keep_index(["a.jpg", "b.png", "c.png"], [(100, 10), (400, 5), (400, 9)]) == 2
    assert keep_index(["b.png", "a.png"], [(400, 9), (400, 9)]) == 1
    assert keep_index(["x.png", "y.png"], [(0, 0), (1, 1)]) == 1  # an unreadable file is never preferred


def test_unit_rows_leave_zero_rows_zero():
    x = unit_rows(np.array([[3, 4], [0, 0]], np.float32))
    np.testing.assert_allclose(x, [[0.6, 0.8], [0, 0]], atol=1e-7)


def test_star_groups_split_a_chain_of_look_alikes_at_the_kept_row():
    # 0~1, 1~2, 2~3 (a chain) and 4~5~6 all pairwise; row 1 is the best to keep, then 3.
    i, j = np.array([0, 1, 2, 4, 4, 5]), np.array([1, 2, 3, 5, 6, 6])
    rank = {0: 5, 1: 0, 2: 4, 3: 1, 4: 2, 5: 3, 6: 6}.__getitem__
    groups = [g.tolist() for g in star_groups(8, i, j, rank)]
    assert groups == [[0, 1, 2], [4, 5, 6]]  # 3 pairs only with 2, which went to 1's group
    assert [g.tolist() for g in connected_groups(8, i, j)] == [[0, 1, 2, 3], [4, 5, 6]]
    # what is left of a component is grouped again: 2~3 without 1 in between
    groups = [g.tolist() for g in star_groups(8, np.array([0, 2]), np.array([1, 3]), rank)]
    assert groups == [[0, 1], [2, 3]]
    rest = [g.tolist() for g in star_groups(8, np.array([0, 0, 2]), np.array([1, 2, 3]), {0: 0, 1: 1, 2: 2, 3: 3}.__getitem__)]
    assert rest == [[0, 1, 2]]  # 3 is paired only with 2 and is left alone, not joined through it


def test_standardised_rows_give_pearson_correlations_and_a_flat_row_none():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(5, 64)).astype(np.float32) * rng.uniform(0.1, 10, size=(5, 1)).astype(np.float32) + 7
    x[4] = 2.5  # a flat image
    s = standardised(x)
    i, j = np.array([0, 0, 1, 2]), np.array([1, 2, 3, 4])
    got = pair_correlations(s, i, j)
    want = [np.corrcoef(x[a], x[b])[0, 1] for a, b in zip(i[:3], j[:3])]
    np.testing.assert_allclose(got[:3], want, atol=1e-5)
    assert got[3] == 0.0
    # a brightness and contrast change is the same picture to the check
    np.testing.assert_allclose(pair_correlations(standardised(np.stack([x[0], 3 * x[0] - 40])), [0], [1]), [1.0],
                               atol=1e-5)


# --- the command on a real store ----------------------------------------------------------------

@pytest.fixture(scope="module")
def store_with_copies(tmp_path_factory, fmnist_test):
    """40 real Fashion-MNIST PNGs, JPEG re-encodes (quality 60) of 6 of them, 2x enlargements of 3,
    and byte copies of 2, embedded by a fresh 2-level run."""
    from PIL import Image

    from conftest import make_run, write_fmnist_folder
    from sjea_tools.pipeline import embed_and_index

    root = tmp_path_factory.mktemp("dups")
    images = write_fmnist_folder(root / "imgs", fmnist_test, 40)
    files = sorted(images.rglob("*.png"))
    copies = {}
    for k, f in enumerate(files[:6]):
        Image.open(f).save(f.with_name(f.stem + "-q60.jpg"), quality=60)
        copies[f.with_name(f.stem + "-q60.jpg")] = f
    for f in files[6:9]:
        im = Image.open(f)
        im.resize((im.width * 2, im.height * 2), Image.LANCZOS).save(f.with_name(f.stem + "-2x.png"))
        copies[f.with_name(f.stem + "-2x.png")] = f
    for f in files[9:11]:
        shutil.copyfile(f, f.with_name(f.stem + "-copy.png"))
        copies[f.with_name(f.stem + "-copy.png")] = f
    run = make_run(root / "runs" / "tiny", levels=2)
    out = root / "emb.h5"
    embed_and_index(images, out, run=run, backend="torch", workers=0, index=False)
    return {"root": root, "images": images, "out": out, "copies": copies}


def folder_state(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*")
            if p.is_file()}


def brute_force_groups(store: Path, level: int, threshold: float) -> list[set[str]]:
    """The groups by the definition: every pair's cosine from a full matrix, components by search."""
    from sjea_tools.store import open_store

    with open_store(store) as s:
        x, paths = s.read_embeddings(level).astype(np.float64), s.paths
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    linked = (x @ x.T) >= threshold
    seen, groups = set(), []
    for start in range(len(x)):
        if start in seen:
            continue
        stack, comp = [start], set()
        while stack:
            a = stack.pop()
            if a not in comp:
                comp.add(a)
                stack.extend(np.flatnonzero(linked[a]).tolist())
        seen |= comp
        if len(comp) > 1:
            groups.append({paths[a] for a in comp})
    return groups


def test_duplicates_json_matches_the_definition_and_groups_byte_copies(store_with_copies, tmp_path):
    out = store_with_copies["out"]
    result = runner.invoke(app, ["duplicates", str(out), "--level", "1", "--threshold", "0.9999", "--no-verify",
                                 "--json"])
    assert result.exit_code == 0, result.output
    got = json.loads(result.stdout)
    assert got["level"] == 1 and got["threshold"] == 0.9999 and got["rows"] == 40 + 11
    assert got["pixel_threshold"] is None and got["pairs"] == got["candidates"]
    groups = [{m["path"] for m in g["members"]} for g in got["groups"]]
    expected = brute_force_groups(out, 1, 0.9999)
    # float32 search and float64 matrix can differ on a pair scoring within 1e-6 of the threshold
    assert sorted(map(sorted, groups)) == sorted(map(sorted, expected))
    images = store_with_copies["images"]
    for copy, original in store_with_copies["copies"].items():
        if copy.name.endswith("-copy.png"):  # identical bytes: identical vectors
            pair = {str(copy.relative_to(images)), str(original.relative_to(images))}
            assert any(pair <= g for g in groups), pair
    assert max(map(len, groups)) < 10  # copies found, not one chain through the whole store
    for g in got["groups"]:
        assert [m["action"] for m in g["members"]].count("keep") == 1 and g["members"][0]["action"] == "keep"
    assert got["to_remove"] == sum(g["size"] - 1 for g in got["groups"])


def test_list_and_grid_are_written_and_nothing_is_deleted(store_with_copies, tmp_path):
    out, images = store_with_copies["out"], store_with_copies["images"]
    before = folder_state(images)
    listing, grid = tmp_path / "keep-remove.csv", tmp_path / "groups.png"
    result = runner.invoke(app, ["duplicates", str(out), "--threshold", "0.9999", "--list", str(listing),
                                 "--grid", str(grid), "--quiet"])
    assert result.exit_code == 0, result.output
    assert "Nothing was deleted" in result.stdout and "keep" in result.stdout
    assert folder_state(images) == before
    rows = list(csv.DictReader(listing.open()))
    assert rows and set(rows[0]) == {"group", "path", "action", "score"}
    by_group: dict[str, list[str]] = {}
    for r in rows:
        by_group.setdefault(r["group"], []).append(r["action"])
        assert (images / r["path"]).is_file()
    assert all(actions.count("keep") == 1 and len(actions) >= 2 for actions in by_group.values())
    from PIL import Image

    with Image.open(grid) as im:
        assert im.format == "PNG" and im.height > 96 * len(by_group)

    again = runner.invoke(app, ["duplicates", str(out), "--list", str(listing)])
    assert again.exit_code == 2 and "--overwrite" in again.stderr
    assert list(csv.DictReader(listing.open())) == rows
    redone = runner.invoke(app, ["duplicates", str(out), "--threshold", "0.9999", "--list", str(listing),
                                 "--overwrite", "--quiet"])
    assert redone.exit_code == 0 and list(csv.DictReader(listing.open())) == rows


def test_the_default_threshold_is_used_without_the_option(store_with_copies):
    result = runner.invoke(app, ["duplicates", str(store_with_copies["out"]), "--json"])
    assert result.exit_code == 0, result.output
    got = json.loads(result.stdout)
    # This store's run has no centring means (raw cosines): the default measured on raw cosines.
    assert got["threshold"] == UNCENTRED_THRESHOLD and got["pixel_threshold"] == DEFAULT_PIXEL_THRESHOLD
    assert got["pairs"] <= got["candidates"] and got["unreadable"] == 0


def one_line_error(result, *needles):
    assert result.exit_code != 0, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_bad_input_is_one_line_and_a_non_zero_exit(store_with_copies, tmp_path):
    out = str(store_with_copies["out"])
    one_line_error(runner.invoke(app, ["duplicates", str(tmp_path / "none.h5")]), "does not exist")
    one_line_error(runner.invoke(app, ["duplicates", out, "--level", "5"]), "level 5 does not exist")
    one_line_error(runner.invoke(app, ["duplicates", out, "--level", "0,1"]), "one level")
    one_line_error(runner.invoke(app, ["duplicates", out, "--threshold", "0"]), "above 0 and at most 1")
    one_line_error(runner.invoke(app, ["duplicates", out, "--threshold", "1.5"]), "above 0 and at most 1")
    one_line_error(runner.invoke(app, ["duplicates", out, "--pixel-threshold", "-0.2"]), "above 0 and at most 1")
    one_line_error(runner.invoke(app, ["duplicates", out, "--list", out]), "the store itself")
    one_line_error(runner.invoke(app, ["duplicates", out, "--grid", str(tmp_path)]), "is a folder")


# --- the pixel check on real colour photos ------------------------------------------------------

@pytest.fixture(scope="module")
def photo_store(tmp_path_factory):
    """Four real photos (scikit-image's), a JPEG re-encode of one, a 2x smaller copy of another, and
    two distinct crops of a third: the crops are what an augmentation-invariant embedding joins."""
    skimage_data = pytest.importorskip("skimage.data")
    from PIL import Image

    from conftest import make_run
    from sjea_tools.pipeline import embed_and_index

    root = tmp_path_factory.mktemp("photo-dups")
    images = root / "photos"
    images.mkdir()
    for name in ("astronaut", "coffee", "chelsea", "rocket"):
        Image.fromarray(getattr(skimage_data, name)()).resize((240, 180), Image.LANCZOS).save(images / f"{name}.png")
    Image.open(images / "astronaut.png").save(images / "astronaut-q60.jpg", quality=60)
    Image.open(images / "coffee.png").resize((120, 90), Image.LANCZOS).save(images / "coffee-half.png")
    chelsea = Image.open(images / "chelsea.png")
    chelsea.crop((0, 0, 120, 120)).save(images / "chelsea-left.png")
    chelsea.crop((120, 60, 240, 180)).save(images / "chelsea-right.png")
    run = make_run(root / "runs" / "tiny", levels=1)
    out = root / "photos.h5"
    embed_and_index(images, out, run=run, backend="torch", workers=0, index=False)
    return {"root": root, "images": images, "out": out}


def group_names(result: dict) -> list[set[str]]:
    return sorted(({m["path"] for m in g["members"]} for g in result["groups"]), key=sorted)


def test_the_pixel_check_keeps_copies_and_drops_what_only_the_embedding_joins(photo_store):
    # A threshold of 0.01 makes nearly every pair a candidate: what is grouped is the pixel check's call.
    checked = find_duplicates(photo_store["out"], threshold=0.01)
    assert group_names(checked) == [{"astronaut.png", "astronaut-q60.jpg"}, {"coffee-half.png", "coffee.png"}]
    assert checked["candidates"] > checked["pairs"] == 2
    for g in checked["groups"]:
        assert g["members"][0]["action"] == "keep"
        assert g["members"][0]["path"] in ("astronaut.png", "coffee.png")  # the most pixels
    trusting = find_duplicates(photo_store["out"], threshold=0.01, verify=False)
    assert trusting["pixel_threshold"] is None and trusting["pairs"] == trusting["candidates"] > 2


def test_a_file_gone_since_embedding_leaves_its_pairs_out_and_is_counted(photo_store, tmp_path):
    moved = photo_store["images"] / "coffee-half.png"
    moved.rename(tmp_path / "moved.png")
    try:
        result = runner.invoke(app, ["duplicates", str(photo_store["out"]), "--threshold", "0.01"])
        assert result.exit_code == 0, result.output
        assert "1 file(s) of candidate pairs could not be read" in result.stdout
        assert "1 group(s)" in result.stdout and "coffee" not in result.stdout
    finally:
        (tmp_path / "moved.png").rename(moved)
