"""A PNG of a page in the same headless Chromium as the browser tests (docs/explore.md's figure).

    python -m tests.helpers.screenshot PAGE.html OUT.png [WIDTH [HEIGHT]]
"""
from __future__ import annotations

import sys
from pathlib import Path

from tests.helpers.browser import open_chrome, set_width


def screenshot(page: str, out: str, width: int = 1400, height: int = 1300) -> None:
    driver = open_chrome()
    try:
        set_width(driver, width, height)
        driver.get(Path(page).resolve().as_uri())
        driver.save_screenshot(out)
    finally:
        driver.quit()


if __name__ == "__main__":
    args = sys.argv[1:]
    screenshot(args[0], args[1], *(int(a) for a in args[2:4]))
