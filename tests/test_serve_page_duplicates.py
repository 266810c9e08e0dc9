"""The page's Duplicates view, driven in headless Chromium (the browser fixture of test_serve_browser)
on a real server and the store of test_serve_duplicates (real photos, a JPEG re-encode and a 2x
enlargement of one): the group with the kept file first and its copies marked "remove?", a copy's
original at full size on click, the CSV link, and the empty state. Screenshots go to the test's
temporary folder, or to docs/images/ with SJEA_WRITE_SCREENSHOTS=1."""

from __future__ import annotations

import urllib.request

import pytest

from sjea_tools.duplicates import UNCENTRED_THRESHOLD as DEFAULT_THRESHOLD  # this store is uncentred

pytest.importorskip("fastapi")
pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e .[dev])")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support import expected_conditions as EC  # noqa: E402

from sjea_tools.serve import serve_in_thread  # noqa: E402
from test_serve_browser import browser, saved_screenshot, screenshots, wait  # noqa: E402,F401 - fixtures
from test_serve_duplicates import COPIES, KEPT, ORIGINAL, store_with_copies  # noqa: E402
from test_serve_page_photos import no_broken_images  # noqa: E402


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    made = store_with_copies(tmp_path_factory.mktemp("serve-page-dups"))
    url, stop = serve_in_thread(made["out"])
    yield {**made, "url": url}
    stop()


def scores(url: str) -> list[float]:
    import json

    with urllib.request.urlopen(f"{url}api/duplicates", timeout=60) as r:
        return [m["score"] for m in json.load(r)["groups"][0]["members"]]


def tiles(d) -> list[dict]:
    return [{"path": t.get_attribute("data-path"), "action": t.find_element(By.CSS_SELECTOR, ".action").text,
             "name": t.find_element(By.CSS_SELECTOR, ".name").text, "element": t}
            for t in d.find_elements(By.CSS_SELECTOR, "#dup-groups .dup-group .tile")]


def test_duplicates_view_shows_the_kept_file_its_copies_and_opens_an_original(browser, served, screenshots):
    d = browser
    d.get(served["url"])
    wait(d).until(EC.element_to_be_clickable((By.ID, "tab-duplicates"))).click()
    wait(d).until(EC.presence_of_element_located((By.CSS_SELECTOR, "#dup-groups .dup-group")))
    assert "Nothing is deleted" in d.find_element(By.CSS_SELECTOR, "#duplicates-view .explain").text
    assert not d.find_element(By.ID, "search-view").is_displayed()
    shown = tiles(d)
    assert [t["path"] for t in shown] == [KEPT, ORIGINAL, COPIES[0]]
    assert [t["name"] for t in shown] == [t["path"] for t in shown]
    assert shown[0]["action"] == "keep" and "keep" in shown[0]["element"].get_attribute("class")
    # the server's score as it is (6 decimals): 0.999983 is not rounded up to look identical
    assert [t["action"] for t in shown[1:]] == [f"remove? (cosine {s})" for s in scores(served["url"])[1:]]
    assert d.find_element(By.ID, "dup-summary").text.startswith(f"1 group(s) at threshold {DEFAULT_THRESHOLD} (cosine, level 0, pixels confirmed at")
    wait(d).until(no_broken_images)
    saved_screenshot(d, screenshots / "serve-duplicates.png")

    # The CSV link downloads the keep/remove list.
    href = d.find_element(By.ID, "dup-csv").get_attribute("href")
    with urllib.request.urlopen(href, timeout=30) as r:
        lines = r.read().decode().splitlines()
    assert lines[0] == "group,path,action,score" and lines[1].startswith(f"0,{KEPT},keep,") and len(lines) == 4

    # A copy opens at full size: the file itself, not a thumbnail.
    shown[2]["element"].click()
    wait(d).until(EC.visibility_of_element_located((By.ID, "viewer")))
    wait(d).until(lambda drv: drv.execute_script("const i = document.getElementById('viewer-img'); "
                                                 "return i.complete && i.naturalWidth > 0"))
    from PIL import Image

    with Image.open(served["images"] / COPIES[0]) as img:
        size = list(img.size)
    assert d.find_element(By.ID, "viewer-name").text == COPIES[0]
    assert d.execute_script("const i = document.getElementById('viewer-img'); "
                            "return [i.naturalWidth, i.naturalHeight]") == size
    d.find_element(By.ID, "viewer-close").click()


def test_no_duplicates_is_a_plain_message(browser, served):
    d = browser
    d.get(served["url"])
    wait(d).until(EC.element_to_be_clickable((By.ID, "tab-duplicates"))).click()
    wait(d).until(EC.presence_of_element_located((By.CSS_SELECTOR, "#dup-groups .dup-group")))
    d.find_element(By.ID, "dup-threshold").send_keys("1")
    d.find_element(By.ID, "dup-find").click()
    wait(d).until(EC.text_to_be_present_in_element((By.ID, "dup-summary"), "No duplicates at threshold 1 "))
    assert d.find_elements(By.CSS_SELECTOR, "#dup-groups .dup-group") == []
    assert not d.find_element(By.ID, "dup-csv").is_displayed()
    assert not d.find_element(By.ID, "error").is_displayed()
    assert no_broken_images(d)
    # A bad threshold is the server's one message in the error box.
    d.find_element(By.ID, "dup-threshold").clear()
    d.find_element(By.ID, "dup-threshold").send_keys("2")
    d.find_element(By.ID, "dup-find").click()
    wait(d).until(EC.visibility_of_element_located((By.ID, "error")))
    assert d.find_element(By.ID, "error").text.startswith("threshold must be a number in (0, 1]")
