"""`python -m rhead_jax.explore` on a real SmolLM2-135M sweep with captures (3 tests: length 500,
depth 50, the 3 bundled needles; run through the sweep command as a user would), and the page
driven in headless Chromium (selenium + Debian's chromium-driver, which .ci/run installs):

  pick a test and a head -> the highlighted positions are the stored top-1 captures, the steps
  marked as copy events are the ones rhead_jax.scoring counts and add up to that head's score on
  that test (results.jsonl); pick a generated token -> every head that copied it; no request over
  the network, no console error, no horizontal scrollbar at 1,400 px or 390 px.

The browser tests are skipped only where no browser, driver or selenium is installed, with the
reason (tests.helpers.browser.webdriver_missing); CI has them (.ci/run)."""
from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from rhead_jax import captures, scoring
from tests.helpers.browser import console_errors, horizontal_overflow, network_requests, open_chrome, webdriver_missing

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "JAX_PLATFORMS": "cpu"}
GRID = ["--config.sweep.lengths=(500,)", "--config.sweep.depths=(50,)"]


def _run(*args, timeout=900):
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=ENV, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def sweep(smollm_gguf, tmp_path_factory):
    """A 3-test SmolLM2 sweep with --config.sweep.save_captures=True (the sweep command)."""
    wd = tmp_path_factory.mktemp("explore") / "sweep"
    out = _run("rhead_jax.sweep", "--config", "smollm2_135m.py", *GRID, "--config.sweep.save_captures=True",
               f"--workdir={wd}")
    assert out.returncode == 0, out.stderr[-2000:]
    return wd


@pytest.fixture(scope="module")
def page(sweep):
    out_dir = sweep.parent / "page"
    out = _run("rhead_jax.explore", str(sweep), "--out", str(out_dir), "--zero_heads=2")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "wrote" in out.stdout and "3 of 3 tests" in out.stdout
    return out_dir / "explore.html"


def _data(page: Path) -> dict:
    m = re.search(r'<script type="application/json" id="data">(.*?)</script>', page.read_text(), re.S)
    return json.loads(m.group(1))


def _results(wd):
    return {r["key"]: r for r in map(json.loads, (wd / "results.jsonl").read_text().splitlines())}


def test_page_holds_the_captures_and_the_scores_copy_events(sweep, page):
    data, results = _data(page), _results(sweep)
    caps = captures.read_workdir(str(sweep))
    head_scores = json.loads((sweep / "head_scores.json").read_text())
    means = scoring.head_means(head_scores)
    top = [k for k, m in scoring.top_heads(head_scores, 16) if m > 0]
    assert data["chosen_heads"][:len(top)] == top and len(data["chosen_heads"]) == len(top) + 2
    assert all(means[k] == 0 for k in data["chosen_heads"][len(top):])
    assert data["grid"][18][6] == round(means["18-6"], 4) and data["top_k"] == 4
    assert [t["key"] for t in data["tests"]] == list(results)
    events_seen = 0
    for t in data["tests"]:
        r, c = results[t["key"]], caps[t["key"]]
        ev = c.copy_events()
        assert t["generated"] == c.token_text and t["span"] == r["span"]
        assert [t["copiers"][n] for n in range(len(ev))] == [
            [f"{l}-{h}" for l, h in np.argwhere(ev[n])] for n in range(len(ev))]
        for key in data["chosen_heads"]:
            l, h = scoring.parse_head(key)
            assert t["top"][key] == c.topk_index[:, l, h].tolist()
            assert len(t["events"][key]) == r["copy_counts"][l][h] == t["counts"][key]
            assert t["scores"][key] == r["scores"][l][h]
            assert abs(len(t["events"][key]) / (r["span"][1] - r["span"][0]) - r["scores"][l][h]) < 1e-9
            events_seen += len(t["events"][key])
    assert events_seen > 0   # the real model copies: the check above is not vacuous
    assert len(page.read_bytes()) < 200_000   # 3 tests (the 27-test grid: docs/explore.md)


def test_explore_bad_inputs(sweep, tmp_path):
    bare = tmp_path / "bare"
    shutil.copytree(sweep, bare)
    for f in (bare / "batches").glob("*.npz"):
        f.unlink()
    cases = [((), "give one sweep workdir"),
             ((str(sweep),), "--out is required"),
             ((str(tmp_path / "nope"), "--out", str(tmp_path / "o")), "not found"),
             ((str(bare), "--out", str(tmp_path / "o")), "--config.sweep.save_captures=True"),
             ((str(sweep), "--out", str(tmp_path / "o"), "--heads=30-0"), "outside this model's 30 layers x 9 heads"),
             ((str(sweep), "--out", str(tmp_path / "o"), "--heads=a-b"), "malformed head"),
             ((str(sweep), "--out", str(tmp_path / "o"), "--tests=L9_D0_N0"), "no test 'L9_D0_N0'"),
             ((str(sweep), "--out", str(tmp_path / "o"), "--max_tests=0"), "--max_tests must be 1 or more")]
    for args, why in cases:
        out = _run("rhead_jax.explore", *args, timeout=120)
        lines = out.stderr.strip().splitlines()
        assert out.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:") and why in lines[0], \
            (args, out.stderr[-800:])
    assert not (tmp_path / "o").exists()


def test_explore_picks_tests_and_heads(sweep, tmp_path):
    out = _run("rhead_jax.explore", str(sweep), "--out", str(tmp_path), "--tests=L500_D50_N1", "--heads=0-0,18-6",
               timeout=120)
    assert out.returncode == 0, out.stderr[-800:]
    data = _data(tmp_path / "explore.html")
    assert [t["key"] for t in data["tests"]] == ["L500_D50_N1"] and data["chosen_heads"] == ["0-0", "18-6"]
    assert data["left_out_tests"] == ["L500_D50_N0", "L500_D50_N2"]


# -- in the browser --------------------------------------------------------------------------------

needs_browser = pytest.mark.skipif(webdriver_missing() is not None, reason=str(webdriver_missing()))


@pytest.fixture(scope="module")
def driver():
    d = open_chrome()
    yield d
    d.quit()


@needs_browser
def test_explore_page_in_the_browser(sweep, page, driver):
    from selenium.webdriver.common.by import By

    results, caps = _results(sweep), captures.read_workdir(str(sweep))
    data = _data(page)
    driver.get(page.resolve().as_uri())
    key = data["tests"][1]["key"]
    head = "18-6" if "18-6" in data["chosen_heads"] else data["chosen_heads"][0]
    l, h = scoring.parse_head(head)
    driver.find_element(By.CSS_SELECTOR, f'#tests tr[data-key="{key}"]').click()
    driver.find_element(By.CSS_SELECTOR, f'#grid td[data-head="{head}"]').click()
    c, r = caps[key], results[key]
    top1 = c.topk_index[:, l, h, 0].tolist()
    rows = driver.find_elements(By.CSS_SELECTOR, "#steps tr[data-step]")
    assert [int(x.get_attribute("data-top1")) for x in rows] == top1
    hits = {int(x.get_attribute("data-pos")) for x in driver.find_elements(By.CSS_SELECTOR, ".hit[data-pos]")}
    assert hits == set(top1)
    copied = [int(x.get_attribute("data-step")) for x in rows if x.get_attribute("data-copy") == "1"]
    assert copied == np.nonzero(c.copy_events()[:, l, h])[0].tolist()
    marked = [int(x.get_attribute("data-step")) for x in driver.find_elements(By.CSS_SELECTOR, "#generated .gtok.copy")]
    assert marked == copied and len(copied) == r["copy_counts"][l][h] > 0
    span_len = r["span"][1] - r["span"][0]
    assert abs(len(copied) / span_len - r["scores"][l][h]) < 1e-9
    info = driver.find_element(By.ID, "head-info")
    assert int(info.get_attribute("data-events")) == len(copied) and float(info.get_attribute("data-score")) == \
        r["scores"][l][h]
    # a generated token: every head that copied it at that step
    step = copied[0]
    driver.find_element(By.CSS_SELECTOR, f'#generated .gtok[data-step="{step}"]').click()
    pills = [x.get_attribute("data-head") for x in driver.find_elements(By.CSS_SELECTOR, "#copiers .pill")]
    assert pills == [f"{a}-{b}" for a, b in np.argwhere(c.copy_events()[step])] and head in pills
    red = {x.get_attribute("data-head") for x in driver.find_elements(By.CSS_SELECTOR, "#grid td.copier")}
    assert red == set(pills)
    # a head without its captures on the page says how to add it
    off = next(f"{a}-{b}" for a in range(data["layers"]) for b in range(data["heads"])
               if f"{a}-{b}" not in data["chosen_heads"])
    driver.find_element(By.CSS_SELECTOR, f'#grid td[data-head="{off}"]').click()
    assert f"--heads {off}" in info.text and not driver.find_elements(By.CSS_SELECTOR, "#steps tr")
    assert console_errors(driver) == [] and network_requests(driver) == []
    assert "left out" not in driver.find_element(By.ID, "meta").text   # every test is on it
    rest = data["layers"] * data["heads"] - len(data["chosen_heads"])
    assert f"the other {rest} are in the grid" in driver.find_element(By.ID, "meta").text


@needs_browser
@pytest.mark.parametrize("width", [1400, 390])
def test_explore_page_has_no_horizontal_scrollbar(page, driver, width):
    res = horizontal_overflow(driver, page, width)
    assert res["scroll_width"] <= res["client_width"] and not res["widest"], res
    assert console_errors(driver) == [] and network_requests(driver) == []


def test_page_escapes_what_it_embeds(sweep, tmp_path):
    from rhead_jax import exploration

    data = exploration.page_data(str(sweep), tests=["L500_D50_N0"], heads=["18-6"])
    data["tests"][0]["generated"][0] = "</script><b>x</b><!--"
    path = exploration.write_page(data, tmp_path)
    text = path.read_text()
    assert "</script><b>" not in text and "<!--" not in text
    assert _data(path)["tests"][0]["generated"][0] == "</script><b>x</b><!--"
    assert html.escape(data["model"]) in text


@pytest.mark.slow
def test_the_27_test_grid_keeps_its_scores_and_its_page_stays_under_1_mib(smollm_gguf, tmp_path):
    """The default SmolLM2 sweep with captures: head_scores.json as without them (sha256 c4f0edec...502a3c),
    and the default page of its 27 tests under 1 MiB (docs/explore.md)."""
    import hashlib

    wd = tmp_path / "sweep"
    out = _run("rhead_jax.sweep", "--config", "smollm2_135m.py", "--config.sweep.save_captures=True",
               f"--workdir={wd}", timeout=1800)
    assert out.returncode == 0, out.stderr[-2000:]
    digest = hashlib.sha256((wd / "head_scores.json").read_bytes()).hexdigest()
    assert digest.startswith("c4f0edec") and digest.endswith("502a3c")
    out = _run("rhead_jax.explore", str(wd), "--out", str(tmp_path / "page"))
    assert out.returncode == 0, out.stderr[-2000:]
    size = (tmp_path / "page" / "explore.html").stat().st_size
    assert "27 of 27 tests" in out.stdout and size < 1 << 20, size
