"""Headless Chromium for tests of the HTML pages vqkit writes (the bench report, the pager).

``needs_chromium`` skips a test where Chromium is not installed. :func:`screenshot` loads a page
and returns its console messages; :func:`dump_dom` returns the DOM after the page's scripts ran
(the URL may carry a ``#fragment``) with the console messages.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="chromium is not installed: apt-get install chromium"
)


def run_chromium(
    url: str, profile: Path, *args: str, budget_ms: int = 5000
) -> tuple[str, list[str]]:
    """Run headless Chromium on ``url`` with extra ``args`` for ``budget_ms`` of virtual time;
    returns its stdout and the console lines it logged (errors thrown by the page's scripts
    among them)."""
    argv = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        "--enable-logging=stderr",
        "--v=0",
        f"--virtual-time-budget={budget_ms}",
        *args,
        url,
    ]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=90, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout, [line for line in done.stderr.splitlines() if ":CONSOLE" in line]


def screenshot(page: Path, shot: Path, profile: Path, size: str = "1200,2000") -> list[str]:
    """Load ``page`` headless, screenshot it to ``shot`` and return its console messages."""
    args = (f"--screenshot={shot}", f"--window-size={size}")
    return run_chromium(page.resolve().as_uri(), profile, *args)[1]


def dump_dom(
    page: Path, profile: Path, fragment: str = "", budget_ms: int = 5000
) -> tuple[str, list[str]]:
    """The DOM of ``page`` (opened at ``#fragment``) after its scripts ran, and its console."""
    url = page.resolve().as_uri() + (f"#{fragment}" if fragment else "")
    return run_chromium(url, profile, "--dump-dom", budget_ms=budget_ms)
