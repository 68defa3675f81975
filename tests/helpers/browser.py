"""Open a report in headless Chromium (Debian's `chromium`) and check the page as a reader's browser sees it.

`check_page(path)` copies the page, adds one inline script that runs after the load event (the
report itself has no scripts), dumps the DOM with `chromium --headless --dump-dom` (network off) and
returns what the script found: images that did not decode, in-page links without their anchor,
resources fetched or referenced over http(s). `chromium_binary()` is None where no browser is installed.
"""
from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")

PROBE = """<script>
window.addEventListener("load", () => {
  const imgs = [...document.images];
  const res = {
    images: imgs.length,
    broken_images: imgs.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.alt || i.src.slice(0, 40)),
    non_data_images: imgs.filter(i => !i.src.startsWith("data:")).map(i => i.src.slice(0, 80)),
    links: 0, missing_anchors: [], http_refs: [],
    fetched: performance.getEntriesByType("resource").map(e => e.name).filter(n => /^https?:/.test(n)),
    title: document.title,
    h2: [...document.querySelectorAll("h2")].map(h => h.textContent),
    text: document.body.innerText.length,
  };
  for (const a of document.querySelectorAll('a[href^="#"]')) {
    res.links += 1;
    const id = decodeURIComponent(a.getAttribute("href").slice(1));
    if (!document.getElementById(id)) res.missing_anchors.push(id);
  }
  for (const el of document.querySelectorAll("*")) {
    for (const attr of ["src", "href", "srcset", "poster", "action", "data", "background"]) {
      const v = el.getAttribute(attr);
      if (v && /^\\s*(https?:)?\\/\\//i.test(v)) res.http_refs.push(el.tagName + " " + attr + "=" + v.slice(0, 80));
    }
    const st = el.getAttribute("style") || "";
    if (/url\\(\\s*['"]?(https?:)?\\/\\//i.test(st)) res.http_refs.push(el.tagName + " style url");
  }
  for (const s of document.querySelectorAll("style")) {
    if (/url\\(\\s*['"]?(https?:)?\\/\\//i.test(s.textContent) || /@import/i.test(s.textContent))
      res.http_refs.push("style element url/import");
  }
  document.body.setAttribute("data-rhead-check", JSON.stringify(res));
});
</script>"""


def chromium_binary() -> str | None:
    for name in CANDIDATES:
        path = shutil.which(name)
        if path:
            return path
    return None


def chromium_version(binary: str) -> str:
    return subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=30).stdout.strip()


def check_page(page: str | os.PathLike, binary: str | None = None, timeout: int = 60) -> dict:
    binary = binary or chromium_binary()
    if binary is None:
        raise RuntimeError("no chromium binary")
    text = Path(page).read_text(encoding="utf-8")
    assert "</body>" in text, "not a complete HTML page"
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "page.html"
        copy.write_text(text.replace("</body>", PROBE + "</body>", 1), encoding="utf-8")
        cmd = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
               "--no-first-run", "--disable-extensions", f"--user-data-dir={tmp}/profile",
               "--host-resolver-rules=MAP * ~NOTFOUND", "--virtual-time-budget=10000",
               "--dump-dom", copy.as_uri()]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    m = re.search(r'data-rhead-check="([^"]*)"', proc.stdout)
    if not m:
        raise AssertionError(f"chromium did not run the page's check (rc {proc.returncode}): "
                             f"{proc.stdout[:300]!r} {proc.stderr[-1000:]!r}")
    return json.loads(html.unescape(m.group(1)))


def assert_page_ok(page: str | os.PathLike, min_images: int = 1) -> dict:
    """check_page, then: at least `min_images` images, all decoded from data: URIs, every in-page link
    resolves, no http(s) resource referenced or fetched."""
    res = check_page(page)
    assert res["images"] >= min_images, res
    assert not res["broken_images"], res["broken_images"]
    assert not res["non_data_images"], res["non_data_images"]
    assert not res["missing_anchors"], res["missing_anchors"]
    assert not res["http_refs"] and not res["fetched"], (res["http_refs"], res["fetched"])
    return res


# -- a driven browser (selenium + Debian's chromium-driver) ---------------------------------------

DRIVER_CANDIDATES = ("chromedriver",)


def chromedriver_binary() -> str | None:
    for name in DRIVER_CANDIDATES:
        path = shutil.which(name)
        if path:
            return path
    return None


def webdriver_missing() -> str | None:
    """Why a driven browser cannot run here (None when it can): the test's skip reason."""
    if chromium_binary() is None:
        return "no chromium binary on PATH (Debian: apt-get install chromium chromium-driver; .ci/run installs them)"
    if chromedriver_binary() is None:
        return "no chromedriver on PATH (Debian: apt-get install chromium-driver; .ci/run installs it)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[test]')"
    return None


def open_chrome():
    """Headless Chromium driven by selenium through the local chromedriver (no Selenium Manager, no
    download), every host name unresolvable (nothing can be fetched), console and network logged."""
    from selenium import webdriver

    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium_binary()
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
              "--disable-extensions", "--host-resolver-rules=MAP * ~NOTFOUND", "--window-size=1400,1000"):
        opts.add_argument(a)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    return webdriver.Chrome(options=opts, service=webdriver.ChromeService(executable_path=chromedriver_binary()))


def set_width(driver, width: int, height: int = 900) -> None:
    """Lay the page out `width` CSS pixels wide (a phone's viewport below 600)."""
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                           {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": width < 600})


def horizontal_overflow(driver, page: str | os.PathLike, width: int) -> dict:
    """Load `page` at `width`: {"scroll_width", "client_width", "widest": [the elements sticking out]}
    (a horizontal scrollbar when scroll_width > client_width)."""
    set_width(driver, width)
    driver.get(Path(page).resolve().as_uri())
    return driver.execute_script("""
      const cw = document.documentElement.clientWidth;
      const out = [];
      for (const e of document.querySelectorAll("body *")) {
        const r = e.getBoundingClientRect();
        if (r.right > cw + 0.5 && getComputedStyle(e).position !== "fixed") {
          let p = e.parentElement, clipped = false;
          while (p) { if (["auto", "scroll", "hidden"].includes(getComputedStyle(p).overflowX)) { clipped = true; break; }
                      p = p.parentElement; }
          if (!clipped) out.push(e.tagName + (e.id ? "#" + e.id : "") + " " + Math.round(r.right));
        }
      }
      return {scroll_width: document.documentElement.scrollWidth, client_width: cw, widest: out.slice(0, 8)};
    """)


def network_requests(driver) -> list[str]:
    """URLs the page asked for since the last call (the performance log), data: and file: left out."""
    urls = []
    for entry in driver.get_log("performance"):
        msg = json.loads(entry["message"])["message"]
        if msg.get("method") == "Network.requestWillBeSent":
            url = msg["params"]["request"]["url"]
            if not url.startswith(("data:", "file:")):
                urls.append(url)
    return urls


def console_errors(driver) -> list[str]:
    """The browser console's errors and warnings since the last call."""
    return [e["message"] for e in driver.get_log("browser") if e["level"] in ("SEVERE", "WARNING")]
