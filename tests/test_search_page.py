"""The search page (/ui/) in a real browser: Debian's chromium driven headless by Playwright.

Never downloads a browser: skipped when /usr/bin/chromium is absent
(`apt-get install -y chromium`). Uses the same tiny real bundle as tests/test_service.py.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

pytestmark = [pytest.mark.browser, pytest.mark.integration]

CHROMIUM = Path(os.environ.get("MARKETPLACE_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]

if not CHROMIUM.exists():
    pytest.skip(f"{CHROMIUM} not found: install Debian's chromium (apt-get install -y chromium)", allow_module_level=True)
playwright_api = pytest.importorskip("playwright.sync_api", reason="the python 'playwright' package is not installed")


@pytest.fixture(scope="module")
def server(bundle_dir, tmp_path_factory):
    from tests.support.serving import ServiceProcess

    tmp = tmp_path_factory.mktemp("search_page")
    proc = ServiceProcess(bundle_dir, tmp / "bentoml_home", tmp / "serve.log")
    proc.start(timeout=240)
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def browser():
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture()
def page(browser, server):
    context = browser.new_context()
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(f"{server.url}/ui/", wait_until="domcontentloaded")
    page.wait_for_selector("body[data-ready='true']", timeout=30_000)
    yield page
    context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


def _cards(page):
    page.wait_for_selector("#results .card", timeout=30_000)
    return page.locator("#results .card")


def test_text_query_shows_ranked_cards_with_thumbnails(page, server) -> None:
    page.fill("#query", "acoustic guitar")
    page.click("#submit")
    cards = _cards(page)
    count = cards.count()
    assert 1 <= count <= 10
    first = cards.first
    assert first.locator(".name").inner_text().strip()
    assert first.locator(".price").inner_text().startswith("£") or "n/a" in first.locator(".price").inner_text()
    assert first.locator(".category").inner_text().strip()
    # thumbnails are real, loaded images served by the service
    images = page.locator("#results .card img.thumb")
    assert images.count() >= 1
    images.first.scroll_into_view_if_needed()
    page.wait_for_function(
        "() => { const i = document.querySelector('#results .card img.thumb'); return i && i.complete && i.naturalWidth > 0; }",
        timeout=30_000,
    )
    assert "/ui/thumbnails/" in images.first.get_attribute("src")
    # the ranking is the service's: scores non-increasing down the page
    scores = [float(t.split()[-1]) for t in page.locator("#results .card .score").all_inner_texts()]
    assert scores == sorted(scores, reverse=True)
    assert "Looks like:" in page.locator("#prediction").inner_text()
    assert "found" in page.locator("#status").inner_text()


def test_category_filter_and_result_count(page) -> None:
    options = page.locator("#category option").all_inner_texts()
    assert len(options) >= 2  # "All categories" + the bundle's categories
    chosen = options[1]
    page.select_option("#category", label=chosen)
    page.select_option("#k", "5")
    page.fill("#query", "used item in good condition")
    page.click("#submit")
    cards = _cards(page)
    assert 1 <= cards.count() <= 5
    assert set(page.locator("#results .card .category").all_inner_texts()) == {chosen}


def test_photo_upload_search(page, bundle_dir, tmp_path) -> None:
    photo = sorted((bundle_dir / "thumbnails").glob("*.jpg"))[0]
    page.set_input_files("#photo", str(photo))
    page.click("#submit")
    cards = _cards(page)
    assert cards.count() >= 1
    assert "image index" in page.locator("#status").inner_text()
    ids = [c.get_attribute("data-product-id") for c in cards.all()]
    assert len(ids) == len(set(ids))


def test_numeric_query_is_sent_as_text(page) -> None:
    page.fill("#query", "123")
    page.click("#submit")
    assert _cards(page).count() >= 1


def test_empty_submit_shows_a_message(page) -> None:
    page.click("#submit")
    error = page.locator("#error")
    error.wait_for(state="visible", timeout=10_000)
    assert "search text" in error.inner_text()
    assert page.locator("#results .card").count() == 0


def test_a_non_image_upload_shows_the_service_error(page, tmp_path) -> None:
    bogus = tmp_path / "notes.jpg"
    bogus.write_bytes(b"this is not a photo\n" * 5)
    page.set_input_files("#photo", str(bogus))
    page.click("#submit")
    error = page.locator("#error")
    error.wait_for(state="visible", timeout=30_000)
    assert "accepted formats" in error.inner_text()



def test_more_like_this_on_every_card(page) -> None:
    page.fill("#query", "acoustic guitar")
    page.click("#submit")
    cards = _cards(page)
    assert cards.count() >= 1
    # every result card offers "more like this"
    assert page.locator("#results .card .more-like-this").count() == cards.count()
    first_id = cards.first.get_attribute("data-product-id")
    cards.first.locator(".more-like-this").click()
    page.wait_for_function(
        "(pid) => document.querySelector('#results').dataset.similarTo === pid", arg=first_id, timeout=30_000
    )
    cards = _cards(page)
    ids = [c.get_attribute("data-product-id") for c in cards.all()]
    assert ids and first_id not in ids and len(ids) == len(set(ids))
    assert "like" in page.locator("#status").inner_text()
    scores = [float(t.split()[-1]) for t in page.locator("#results .card .score").all_inner_texts()]
    assert scores == sorted(scores, reverse=True)
    # and from there again
    cards.first.locator(".more-like-this").click()
    page.wait_for_function(
        "(pid) => document.querySelector('#results').dataset.similarTo === pid", arg=ids[0], timeout=30_000
    )
