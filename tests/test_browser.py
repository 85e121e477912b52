"""The SAE feature browser in a real headless Chromium (Debian's chromium + chromedriver, driven by selenium).

The set-up installs Chromium with apt-get when it is missing (root, as on CI machines).
"""

from __future__ import annotations

import os
import shutil
import subprocess

import numpy as np
import pytest

from diffdissect.data import ArraySource
from diffdissect.sae import TrainConfig, train_sae
from diffdissect.sae.browser import browser_data, write_browser
from diffdissect.sae.features import analyse_features
from diffdissect.store import write_array_store

CHROMIUM, DRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


def _install_chromium() -> None:
    if shutil.which("chromium") and shutil.which("chromedriver"):
        return
    if not shutil.which("apt-get"):
        pytest.fail("Chromium is missing and apt-get is not available: install chromium and chromium-driver")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    command = ["apt-get", "install", "-y", "--no-install-recommends", "chromium", "chromium-driver"]
    if subprocess.run(command, capture_output=True, env=env).returncode != 0:
        subprocess.run(["apt-get", "update"], check=True, capture_output=True, env=env)
        subprocess.run(command, check=True, capture_output=True, env=env)


@pytest.fixture(scope="module")
def browser():
    _install_chromium()
    webdriver = pytest.importorskip("selenium.webdriver", reason="pip install -e .[test] installs selenium")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=DRIVER))
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    """A per-location SAE on planted 2x2 maps whose colour decides which channel lights up where."""
    tmp = tmp_path_factory.mktemp("browser")
    rng = np.random.default_rng(0)
    n, d = 300, 8
    colour = rng.integers(0, 4, n)
    maps = rng.normal(0, 0.1, (n, d, 2, 2)).astype(np.float32)
    for i in range(n):
        maps[i, colour[i], i % 2, (i // 2) % 2] += 3.0
    images = np.zeros((n, 8, 8, 3), np.uint8)
    images[..., 0] = (colour * 60)[:, None, None]
    names = ["red", "green", "blue", "grey"]
    rows = [
        {"input_id": f"im{i:03d}", "colour": names[c], "source_index": i, "caption": f"a {names[c]} patch"}
        for i, c in enumerate(colour)
    ]
    write_array_store(tmp / "store", {("maps", 10): maps}, rows)
    train_sae(
        tmp / "store",
        TrainConfig(
            layer="maps", t=10, tokens=True, k=2, n_latents=16, batch_size=200, steps=150, heldout_fraction=0.3
        ),
        tmp / "sae",
        progress=False,
    )
    results, acts, held = analyse_features(tmp / "sae")
    data = browser_data(results, acts, held, ArraySource(images))
    return write_browser(tmp / "browser.html", data), data


def rows(browser):
    return browser.find_elements("css selector", "#latents tbody tr.latent-row")


def test_browser_loads_sorts_filters_and_opens_a_detail_view(browser, page):
    path, data = page
    browser.get(path.as_uri())
    assert "SAE features: maps @ t=10" in browser.title
    listed = rows(browser)
    assert len(listed) == len(data["latents"]) > 0
    frequencies = [float(r.find_elements("tag name", "td")[1].text) for r in listed]
    assert frequencies == sorted(frequencies, reverse=True)  # default: most frequent first

    browser.find_element("css selector", "th[data-key='latent']").click()  # sort by latent id
    ids = [int(r.find_element("tag name", "td").text) for r in rows(browser)]
    assert ids == sorted(ids, reverse=True)

    minimum = browser.find_element("id", "minfreq")
    minimum.clear()
    minimum.send_keys("2")  # no latent fires on >100% of images
    assert rows(browser) == []
    minimum.clear()
    minimum.send_keys("0")

    target = rows(browser)[0]
    latent = target.find_element("tag name", "td").text
    target.click()
    assert browser.find_element("id", "detail-title").text == f"latent {latent}"
    tiles = browser.find_elements("css selector", "#top-images .top-image")
    assert len(tiles) >= 1
    assert browser.find_elements("css selector", "#top-images img.heatmap")  # per-location: where it fires
    assert browser.execute_script("return document.querySelector('#top-images img.image').naturalWidth") == 64


def test_browser_switches_the_purity_label(browser, page):
    from selenium.webdriver.support.ui import Select

    path, data = page
    browser.get(path.as_uri())
    assert data["labels"] == ["colour"]
    Select(browser.find_element("id", "label")).select_by_value("colour")
    assert browser.find_element("css selector", "th[data-key='purity']").text == "purity (colour)"
    assert len(rows(browser)) == len(data["latents"])


def test_browser_shows_each_latents_enriched_caption_words(browser, page):
    """Labels for unlabelled data: the caption words enriched among a latent's top images, with BH q-values."""
    path, data = page
    labelled = [l for l in data["latents"] if l["words"]]
    assert labelled and all(w["q"] < 0.05 for l in labelled for w in l["words"])
    assert {l["words"][0]["word"] for l in labelled} <= {"red", "green", "blue", "grey"}
    browser.get(path.as_uri())
    assert browser.find_element("css selector", "th[data-key='words']").text == "caption words (BH q)"
    row = browser.find_element("css selector", f"#latents tr[data-latent='{labelled[0]['latent']}']")
    assert labelled[0]["words"][0]["word"] in row.text
    row.click()
    cells = browser.find_elements("css selector", "#words td")
    assert cells and cells[0].text in {"red", "green", "blue", "grey"}
    assert "chosen on half A" in browser.find_element("id", "summary").text
