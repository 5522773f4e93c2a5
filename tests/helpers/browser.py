"""Debian chromium driven by Playwright (never `playwright install`)."""

import shutil

import pytest

#: no GPU, no background traffic
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
]

needs_chromium = pytest.mark.skipif(
    shutil.which("chromium") is None, reason="Debian chromium is not installed (apt-get install -y chromium)"
)
