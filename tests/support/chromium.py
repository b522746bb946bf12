"""Browser tests drive Debian's Chromium (`/usr/bin/chromium`) through Playwright, never
Playwright's own browser download. Without Chromium they skip, naming the fix, unless
INSERTCOIN_TEST_REQUIRE_SERVICES=1 (CI), where a missing browser fails the run."""

from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

import pytest
from playwright.sync_api import Browser, sync_playwright

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


def unavailable(why: str) -> NoReturn:
    if REQUIRE:
        pytest.fail(f"{why}; the browser tests are required (INSERTCOIN_TEST_REQUIRE_SERVICES=1)")
    pytest.skip(why)


@pytest.fixture(scope="session")
def browser() -> Iterator[Browser]:
    """Chromium, headless, with a throw-away profile (Playwright's default)."""
    if not CHROMIUM.exists():
        unavailable(f"Chromium is not installed at {CHROMIUM}: {FIX}")
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
        )
        try:
            yield launched
        finally:
            launched.close()
