"""The page of `sjea serve` driven in headless Chromium (Debian's chromium + chromium-driver, through
selenium) on a real server and a real store: upload a Fashion-MNIST image, see its own file at rank 1,
click a result and get its neighbours, see an error shown, open the cluster tree; screenshots are
saved in the test's temporary folder, or, with SJEA_WRITE_SCREENSHOTS=1, as docs/images/serve.png and
docs/images/serve-clusters.png (the README shows the first): a plain run never changes tracked files.

Skipped, with the reason, only where no browser can be started."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e .[dev])")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support import expected_conditions as EC  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

from sjea_tools.serve import serve_in_thread  # noqa: E402

DOCS_IMAGES = Path(__file__).resolve().parents[1] / "docs" / "images"
BROWSERS = ("chromium", "chromium-browser", "google-chrome")
DRIVERS = ("chromedriver",)
# The flags a container needs (no sandbox, no GPU, small /dev/shm) and none of the background
# traffic a fresh profile starts (there is no network here).
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1400,950")
N = 300


def find(names) -> str | None:
    for name in names:
        for candidate in (shutil.which(name), f"/usr/bin/{name}", f"/usr/lib/chromium/{name}"):
            if candidate and Path(candidate).is_file():
                return candidate
    return None


@pytest.fixture(scope="module")
def browser():
    browser_bin, driver_bin = find(BROWSERS), find(DRIVERS)
    if browser_bin is None or driver_bin is None:
        reason = f"no browser to drive: chromium {'found' if browser_bin else 'missing'}, chromedriver " \
                 f"{'found' if driver_bin else 'missing'} (apt-get install chromium chromium-driver)"
        print(reason)
        pytest.skip(reason)
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="sjea-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = browser_bin
    for flag in FLAGS + (f"--user-data-dir={profile}",):
        options.add_argument(flag)
    try:
        driver = webdriver.Chrome(service=Service(driver_bin), options=options)
    except Exception as e:  # noqa: BLE001 - whatever stops the browser starting is the skip reason
        reason = f"chromium could not be started: {str(e).strip().splitlines()[0][:200]}"
        print(reason)
        shutil.rmtree(profile, ignore_errors=True)
        pytest.skip(reason)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture(scope="module")
def served(tmp_path_factory, fmnist_test):
    from conftest import indexed_store

    made = indexed_store(tmp_path_factory.mktemp("serve-page"), fmnist_test, N, name="fmnist.h5")
    out, images, paths, root = made["out"], made["images"], made["paths"], made["root"]
    url, stop = serve_in_thread(out)
    yield {"url": url, "images": images, "paths": paths, "root": root}
    stop()


@pytest.fixture
def screenshots(tmp_path) -> Path:
    """Where the page's screenshots go: docs/images/ only when asked (SJEA_WRITE_SCREENSHOTS=1, to
    refresh the documentation's pictures), else this test's temporary folder."""
    return DOCS_IMAGES if os.environ.get("SJEA_WRITE_SCREENSHOTS") == "1" else tmp_path


def saved_screenshot(driver, path: Path) -> None:
    assert driver.save_screenshot(str(path)), path
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path


def wait(driver, seconds: float = 30):
    return WebDriverWait(driver, seconds)


def first_hits(driver) -> dict[str, dict]:
    """The rank-1 hit of each result column: {column kind: {"id", "path"}}."""
    out = {}
    for col in driver.find_elements(By.CSS_SELECTOR, "#results .column"):
        hit = col.find_element(By.CSS_SELECTOR, ".hit")
        out[col.get_attribute("data-kind")] = {"id": int(hit.get_attribute("data-id")),
                                               "path": hit.get_attribute("data-path")}
    return out


def test_upload_click_and_cluster_tree_in_a_real_browser(browser, served, screenshots):
    d = browser
    d.get(served["url"])
    wait(d).until(EC.text_to_be_present_in_element((By.ID, "store-info"), f"{N} rows"))
    assert d.find_element(By.ID, "error").is_displayed() is False
    # The page starts in `sjea search`'s default mode (per-level); this test wants every column.
    Select(d.find_element(By.ID, "mode")).select_by_value("both")

    # Upload a real Fashion-MNIST image: rank 1 is the same file in every column.
    rel = served["paths"][123]
    d.find_element(By.ID, "file").send_keys(str(served["images"] / rel))
    wait(d).until(EC.text_to_be_present_in_element((By.ID, "query-label"), "upload:"))
    tops = first_hits(d)
    assert set(tops) == {"Level 0", "Level 1", "hierarchical"}
    assert all(t["path"] == rel for t in tops.values()), tops
    saved_screenshot(d, screenshots / "serve.png")

    # Click a result: the page searches from it (rank 1 is that item) and the URL says which.
    second = d.find_elements(By.CSS_SELECTOR, "#results .column[data-kind='hierarchical'] .hit")[1]
    clicked = int(second.get_attribute("data-id"))
    second.click()
    wait(d).until(EC.text_to_be_present_in_element((By.ID, "query-label"), f"id:{clicked}"))
    assert all(t["id"] == clicked for t in first_hits(d).values())
    assert d.current_url.endswith(f"/?id={clicked}")
    assert d.find_element(By.CSS_SELECTOR, "#results .hit.same").get_attribute("data-id") == str(clicked)

    # A bad upload shows the server's one-line message on the page.
    bad = served["root"] / "notes.png"
    bad.write_text("not an image")
    d.find_element(By.ID, "file").send_keys(str(bad))
    wait(d).until(EC.visibility_of_element_located((By.ID, "error")))
    assert "not an image" in d.find_element(By.ID, "error").text

    # The cluster tree: level-0 clusters with thumbnails, then one cluster's sub-clusters and members.
    d.find_element(By.ID, "tab-clusters").click()
    wait(d).until(EC.presence_of_element_located((By.CSS_SELECTOR, "#clusters .cluster img")))
    top_cards = d.find_elements(By.CSS_SELECTOR, "#clusters .cluster")
    assert sum(int(c.text.split("\n")[-1].split()[0]) for c in top_cards) == N
    top_cards[0].click()
    wait(d).until(EC.presence_of_element_located((By.CSS_SELECTOR, "#members .member")))
    title = d.find_element(By.ID, "members-title").text
    assert title.startswith("Members (")
    assert d.find_elements(By.CSS_SELECTOR, "#clusters .cluster[data-depth='1']")
    wait(d).until(lambda drv: drv.execute_script(
        "return [...document.images].filter(i => i.offsetParent && !(i.complete && i.naturalWidth)).length") == 0)
    saved_screenshot(d, screenshots / "serve-clusters.png")

    # A member opens its own search.
    member = d.find_element(By.CSS_SELECTOR, "#members .member")
    mid = member.get_attribute("data-id")
    member.click()
    wait(d).until(EC.text_to_be_present_in_element((By.ID, "query-label"), f"id:{mid}"))
    assert d.find_element(By.ID, "search-view").is_displayed()
