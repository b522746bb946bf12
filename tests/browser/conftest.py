"""The pay-flow browser tests: a phone-sized page in the shared Chromium
(`tests/support/chromium.py`)."""

from collections.abc import Iterator

import pytest
from playwright.sync_api import Browser, Page


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
