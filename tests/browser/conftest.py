"""Browser tests drive Debian's Chromium (`/usr/bin/chromium`) through Playwright, never
Playwright's own browser download. Without Chromium they skip, naming the fix, unless
INSERTCOIN_TEST_REQUIRE_SERVICES=1 (CI), where a missing browser fails the run."""

from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

import pytest
from playwright.sync_api import Browser, Page, sync_playwright

from tests.support.services import REQUIRE

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
FIX = "install it with `apt-get install -y chromium` (./scripts/test does this when run as root)"


def _unavailable(why: str) -> NoReturn:
    if REQUIRE:
        pytest.fail(f"{why}; the browser tests are required (INSERTCOIN_TEST_REQUIRE_SERVICES=1)")
    pytest.skip(why)


@pytest.fixture(scope="session")
def browser() -> Iterator[Browser]:
    """Chromium, headless, with a throw-away profile (Playwright's default)."""
    if not CHROMIUM.exists():
        _unavailable(f"Chromium is not installed at {CHROMIUM}: {FIX}")
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
        )
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture
def phone(browser: Browser) -> Iterator[Page]:
    """A fresh page in a fresh context (no cookies, no cache), sized like the phone that
    just scanned the cabinet's QR code."""
    context = browser.new_context(
        viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True
    )
    context.set_default_timeout(15_000)
    try:
        yield context.new_page()
    finally:
        context.close()
