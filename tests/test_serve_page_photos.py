"""The page of `sjea serve` on a folder of real colour photos (tests/photo_folder.py, broken files
included): file names instead of ids, the original photo at full size, clusters named by their
majority folder, the controls explained, the CLI's default mode, browsing every row, and an empty
page without a broken query image. Driven in headless Chromium (the browser fixture of
test_serve_browser); the original-file endpoint's refusals are checked through the API as well."""

from __future__ import annotations

import re
import urllib.request
from collections import Counter
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e .[dev])")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support import expected_conditions as EC  # noqa: E402

from conftest import make_run  # noqa: E402
from photo_folder import make_photo_folder  # noqa: E402
from sjea_tools.serve import serve_in_thread  # noqa: E402
from test_serve_browser import browser, first_hits, wait  # noqa: E402,F401 - browser is a fixture

PER_CLASS = 12  # 6 classes: 72 readable photos, more than one browse page of 60


def photo_store(root: Path, per_class: int) -> dict:
    """A photo folder embedded, indexed and clustered by a random-init 2-level run."""
    from sjea_tools.pipeline import embed_and_index
    from sjea_tools.store import open_store

    folder = make_photo_folder(root / "photos", per_class=per_class)
    out = root / "photos.h5"
    embed_and_index(folder["root"], out, run=make_run(root / "runs" / "tiny", levels=2), backend="torch", workers=0)
    with open_store(out) as s:
        paths = list(s.paths)
    return {"images": folder["root"], "out": out, "paths": paths}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    made = photo_store(tmp_path_factory.mktemp("serve-photos"), PER_CLASS)
    url, stop = serve_in_thread(made["out"])
    yield {**made, "url": url}
    stop()


def get(url: str) -> tuple[int, str, bytes]:
    with urllib.request.urlopen(url, timeout=30) as r:
        return r.status, r.headers.get("Content-Type"), r.read()


def no_broken_images(d) -> bool:
    return d.execute_script("return [...document.images].filter(i => i.offsetParent && "
                            "!(i.complete && i.naturalWidth)).length") == 0


def test_empty_page_has_no_broken_query_box_and_the_cli_default_mode(browser, served):
    d = browser
    d.get(served["url"])
    wait(d).until(EC.text_to_be_present_in_element((By.ID, "store-info"), f"{len(served['paths'])} rows"))
    assert not d.find_element(By.ID, "query").is_displayed()
    assert not d.find_element(By.ID, "query-thumb").is_displayed()
    assert no_broken_images(d)
    # The page's default is `sjea search`'s: per-level, which greys out the hierarchical options.
    from sjea_tools.search import DEFAULT_MODE

    assert d.find_element(By.ID, "mode").get_attribute("value") == DEFAULT_MODE == "per-level"
    assert "off" in d.find_element(By.CSS_SELECTOR, "label.hier").get_attribute("class")


def test_controls_are_explained(browser, served):
    d = browser
    d.get(served["url"])
    wait(d).until(EC.text_to_be_present_in_element((By.ID, "store-info"), "rows"))
    for control in ("mode", "level", "order", "probes", "margin", "within", "min-score"):
        label = d.find_element(By.ID, control).find_element(By.XPATH, "..")
        assert len(label.get_attribute("title")) > 30, control
    d.find_element(By.CSS_SELECTOR, "#help summary").click()
    terms = [t.text for t in d.find_elements(By.CSS_SELECTOR, "#help dt")]
    assert {"mode", "order", "probes", "margin", "within", "gate"} <= set(terms)
    assert all(dd.text for dd in d.find_elements(By.CSS_SELECTOR, "#help dd"))


def gate_rows(d, query_id: int, margin: str) -> int:
    """Rows of the hierarchical column's gate after searching `query_id` with this margin."""
    from selenium.webdriver.support.ui import Select

    Select(d.find_element(By.ID, "mode")).select_by_value("hierarchical")
    d.find_element(By.ID, "margin").clear()
    d.find_element(By.ID, "margin").send_keys(margin)
    d.find_element(By.ID, "query-id").clear()
    d.find_element(By.ID, "query-id").send_keys(str(query_id))
    d.execute_script("document.getElementById('results').replaceChildren()")
    d.find_element(By.ID, "search-id").click()
    head = wait(d).until(lambda drv: drv.find_element(By.CSS_SELECTOR, "#results .column[data-kind=hierarchical] h2"))
    return int(re.search(r"\((\d+) rows\)", head.text).group(1))


def test_margin_control_softens_the_gate(browser, served):
    """The page's margin is the API's (and `sjea search --margin`'s): at 0 the gate is one coarse
    cluster, at the maximum 2 every cluster passes (a cosine gap is never above 2)."""
    d = browser
    d.get(served["url"])
    wait(d).until(EC.text_to_be_present_in_element((By.ID, "store-info"), "rows"))
    hard, soft = gate_rows(d, 3, "0"), gate_rows(d, 3, "2")
    assert 0 < hard < soft == len(served["paths"])


def test_results_show_file_names_and_open_the_original(browser, served, tmp_path):
    d, paths = browser, served["paths"]
    q = 7
    d.get(f"{served['url']}?id={q}")
    wait(d).until(EC.text_to_be_present_in_element((By.ID, "query-label"), f"id:{q}"))
    assert d.find_element(By.ID, "query-label").text.startswith(paths[q])
    tops = first_hits(d)
    assert set(tops) == {"Level 0", "Level 1"}  # per-level, as `sjea search` answers
    assert all(t["id"] == q and t["path"] == paths[q] for t in tops.values()), tops
    for hit in d.find_elements(By.CSS_SELECTOR, "#results .hit"):
        assert hit.find_element(By.CSS_SELECTOR, ".path").text == paths[int(hit.get_attribute("data-id"))]
    wait(d).until(no_broken_images)
    d.save_screenshot(str(tmp_path / "photos-search.png"))

    # "full size" opens the original file itself, not a thumbnail.
    hit = d.find_elements(By.CSS_SELECTOR, "#results .column .hit")[1]
    hid = int(hit.get_attribute("data-id"))
    hit.find_element(By.CSS_SELECTOR, "button.link").click()
    wait(d).until(EC.visibility_of_element_located((By.ID, "viewer")))
    wait(d).until(lambda drv: drv.execute_script("const i = document.getElementById('viewer-img'); "
                                                 "return i.complete && i.naturalWidth > 0"))
    from PIL import Image

    with Image.open(served["images"] / paths[hid]) as img:
        size = list(img.size)
    assert d.execute_script("const i = document.getElementById('viewer-img'); "
                            "return [i.naturalWidth, i.naturalHeight]") == size
    assert d.find_element(By.ID, "viewer-name").text == paths[hid]
    wait(d).until(EC.text_to_be_present_in_element((By.ID, "viewer-size"), f"{size[0]} × {size[1]} px"))
    status, kind, body = get(d.find_element(By.ID, "viewer-link").get_attribute("href"))
    assert status == 200 and kind == ("image/jpeg" if paths[hid].endswith(".jpg") else "image/png")
    assert body == (served["images"] / paths[hid]).read_bytes()
    d.save_screenshot(str(tmp_path / "photos-viewer.png"))

    # "Search from it" in the viewer searches from that photo.
    d.find_element(By.ID, "viewer-search").click()
    wait(d).until(EC.text_to_be_present_in_element((By.ID, "query-label"), f"id:{hid}"))
    assert d.find_element(By.ID, "query-label").text.startswith(paths[hid])


def test_clusters_are_named_by_their_majority_folder(browser, served, tmp_path):
    d, paths = browser, served["paths"]
    d.get(served["url"])
    wait(d).until(EC.element_to_be_clickable((By.ID, "tab-clusters"))).click()
    wait(d).until(EC.presence_of_element_located((By.CSS_SELECTOR, "#clusters .cluster img")))
    cards = d.find_elements(By.CSS_SELECTOR, "#clusters .cluster")
    assert cards
    for card in cards:
        title = card.find_element(By.CSS_SELECTOR, ".title").text
        name, count, size = re.fullmatch(r"(\S+) \((\d+) of (\d+)\)", title).groups()
        status, _, body = get(f"{served['url']}api/clusters/0/{card.get_attribute('data-node')}?limit=500")
        import json

        members = json.loads(body)["members"]
        folders = Counter(paths[i].split("/")[0] for i in members)
        assert int(size) == len(members)
        assert int(count) == max(folders.values()) == folders[name], (title, folders)
    wait(d).until(no_broken_images)
    d.save_screenshot(str(tmp_path / "photos-clusters.png"))
    cards[0].click()
    wait(d).until(EC.presence_of_element_located((By.CSS_SELECTOR, "#members .member")))
    crumb = d.find_elements(By.CSS_SELECTOR, "#crumbs a")[-1].text
    assert re.fullmatch(r"L\d+ \S+ \(\d+ of \d+\)", crumb), crumb


def test_browse_every_row_with_names(browser, served, tmp_path):
    d, paths = browser, served["paths"]
    d.get(served["url"])
    d.find_element(By.ID, "tab-browse").click()
    wait(d).until(EC.presence_of_element_located((By.CSS_SELECTOR, "#browse .tile")))
    names = [t.find_element(By.CSS_SELECTOR, ".name").text for t in d.find_elements(By.CSS_SELECTOR, "#browse .tile")]
    assert names == paths[:60]
    assert d.find_element(By.ID, "browse-prev").get_attribute("disabled")
    wait(d).until(no_broken_images)
    d.save_screenshot(str(tmp_path / "photos-browse.png"))
    d.find_element(By.ID, "browse-next").click()
    wait(d).until(EC.text_to_be_present_in_element((By.ID, "browse-range"), f"61–{len(paths)} of {len(paths)}"))
    tiles = d.find_elements(By.CSS_SELECTOR, "#browse .tile")
    assert [int(t.get_attribute("data-id")) for t in tiles] == list(range(60, len(paths)))
    assert d.find_element(By.ID, "browse-next").get_attribute("disabled")
    tiles[0].click()
    wait(d).until(EC.visibility_of_element_located((By.ID, "viewer")))
    assert d.find_element(By.ID, "viewer-name").text == paths[60]


def test_original_endpoint_serves_only_image_files_inside_the_root(tmp_path):
    from fastapi.testclient import TestClient

    from sjea_tools.serve.app import create_app

    made = photo_store(tmp_path, per_class=2)
    images, paths = made["images"], made["paths"]
    client = TestClient(create_app(made["out"]))
    outside = tmp_path / "outside.png"
    outside.write_bytes((images / next(p for p in paths if p.endswith(".png"))).read_bytes())
    vanished, replaced, linked = 0, 1, 2
    (images / paths[vanished]).unlink()
    (images / paths[replaced]).write_text("not a photo any more")
    (images / paths[linked]).unlink()
    (images / paths[linked]).symlink_to(outside)

    ok = client.get("/api/items/3/original")
    assert ok.status_code == 200 and ok.content == (images / paths[3]).read_bytes()
    assert ok.headers["x-content-type-options"] == "nosniff"
    gone = client.get(f"/api/items/{vanished}/original")
    assert gone.status_code == 404 and gone.json() == {
        "error": f"the image file of item {vanished} is no longer in the store's image root."}
    assert client.get(f"/api/items/{replaced}/original").status_code == 400
    assert client.get(f"/api/items/{linked}/original").status_code == 403
    assert client.get("/api/items/..%2F..%2Fetc%2Fpasswd/original").status_code == 404
    page = client.get("/api/items", params={"offset": 2, "limit": 3}).json()
    assert page["total"] == len(paths) and [i["path"] for i in page["items"]] == paths[2:5]
