"""The page without workers: the token prompt, a 10,000-model table that pages, the event stream's
resume after the API went away, and another origin that tries to act through the browser."""

from __future__ import annotations

import re
from collections.abc import Iterator

import httpx
import pytest

from modelbus.events.store import RedisEventStore
from modelbus.services.api import create_app
from modelbus.services.client import ModelBusClient
from modelbus.services.config import AppConfig
from tests.servers import FileServer
from tests.ui.conftest import Served, add_record, free_port, ready, shoot

expect = pytest.importorskip("playwright.sync_api").expect
TOKEN = "ui-test-token-0123456789"


@pytest.fixture()
def client(app_config: AppConfig) -> Iterator[ModelBusClient]:
    app_config.models_path.mkdir(parents=True, exist_ok=True)
    with ModelBusClient(app_config) as c:
        yield c


@pytest.fixture()
def served(app_config: AppConfig) -> Iterator[Served]:
    server = Served(create_app(app_config))
    yield server
    server.stop()


def test_the_page_asks_for_the_token_once_and_shows_nothing_without_it(new_page, modelbus_env: dict[str, str]) -> None:  # type: ignore[no-untyped-def]
    config = AppConfig.load(api_token=TOKEN)
    config.models_path.mkdir(parents=True, exist_ok=True)
    with ModelBusClient(config) as client:
        key = add_record(client, "secret-model")
    server = Served(create_app(config))
    try:
        shell = httpx.get(f"{server.url}/ui", timeout=30)
        assert shell.status_code == 200 and "secret-model" not in shell.text  # the shell carries no data
        policy = shell.headers["content-security-policy"]
        assert "default-src 'self'" in policy and "frame-ancestors 'none'" in policy
        assert shell.headers["x-frame-options"] == "DENY"
        root = httpx.get(f"{server.url}/", timeout=30, follow_redirects=False)
        assert root.status_code == 307 and root.headers["location"] == "/ui"
        assert httpx.get(f"{server.url}/ui/f/models", timeout=30).status_code == 401
        page = new_page()
        page.goto(f"{server.url}/ui")
        dialog = page.locator("#token-dialog")
        expect(dialog).to_be_visible()
        expect(page.locator("#token-input")).to_be_focused()
        shoot(page, "token")
        page.keyboard.type("not-the-token")
        page.keyboard.press("Enter")
        expect(page.locator("#token-error")).to_contain_text("refused")
        expect(dialog).to_be_visible()
        page.fill("#token-input", TOKEN)
        page.keyboard.press("Enter")
        expect(page.locator("#models-table")).to_contain_text("secret-model")
        expect(dialog).to_be_hidden()
        # asked once: the next page of this tab sends it without asking, the event stream too
        page.goto(f"{server.url}/ui/models/{key}")
        expect(page.locator("#model-name")).to_have_text("secret-model")
        expect(dialog).to_be_hidden()
        page.goto(f"{server.url}/ui/events")
        expect(page.locator("#live")).to_have_attribute("data-state", "live")
        expect(dialog).to_be_hidden()
    finally:
        server.stop()


def test_ten_thousand_models_page_without_loading_everything(page, new_page, client: ModelBusClient, served: Served) -> None:  # type: ignore[no-untyped-def]
    from tests.bench.bench_surfaces import _seed
    _seed(client, 10_000)
    ready(page, f"{served.url}/ui")
    rows = page.locator("#models-table tbody tr")
    expect(rows).to_have_count(50)
    expect(page.locator("#count")).to_have_text("10000 models; 1–50 shown")
    expect(rows.first.locator("td.name a")).to_have_text("model-00000")
    shoot(page, "models")
    phone = new_page(viewport={"width": 390, "height": 844}, color_scheme="dark")
    ready(phone, f"{served.url}/ui")
    expect(phone.locator("#models-table tbody tr")).to_have_count(50)
    assert phone.evaluate("document.documentElement.scrollWidth") <= 390 + 1, "the phone view scrolls sideways"
    shoot(phone, "models-phone-dark")
    page.keyboard.press("Tab")  # keyboard: the pager is a link, reached and followed like any
    page.locator("a[rel=next]").focus()
    page.keyboard.press("Enter")
    expect(page.locator("#count")).to_have_text("10000 models; 51–100 shown")
    expect(rows.first.locator("td.name a")).to_have_text("model-00050")
    expect(page).to_have_url(re.compile(r"offset=50"))
    page.select_option("select[name=base]", "sdxl")  # filters are applied as they change
    expect(page.locator("#count")).to_have_text("5000 models; 1–50 shown")
    page.fill("input[name=name]", "MODEL-0999")  # part of a name, any case
    expect(page.locator("#count")).to_have_text("5 models; 1–5 shown")  # the sdxl ones of model-09990..9
    page.select_option("select[name=format]", "diffusers")
    expect(page.locator("#models-table .empty")).to_have_text("No models match these filters.")
    page.go_back()  # a filter replaces the page it was set on: back is the first page, unfiltered
    expect(page.locator("#count")).to_have_text("10000 models; 1–50 shown")
    expect(page.locator("select[name=base]")).to_have_value("")
    loaded = page.evaluate("""() => [...performance.getEntriesByType('navigation'),
                                     ...performance.getEntriesByType('resource')]
                                    .map(e => [e.name, e.decodedBodySize])""")
    assert loaded, "the browser recorded no resources"
    for url, size in loaded:
        assert size < 300_000, f"{url} is {size} bytes: more than a page's worth"
        assert "limit=10000" not in url


def _ticks(store: RedisEventStore, numbers: range) -> None:
    for n in numbers:
        store.publish_activity("ui_tick", {"model_key": f"tick-{n}"})


def test_the_event_stream_resumes_after_a_drop_without_gaps_or_doubles(
        page, app_config: AppConfig, event_store: RedisEventStore) -> None:  # type: ignore[no-untyped-def]
    port = free_port()
    server = Served(create_app(app_config), port)
    try:
        ready(page, f"{server.url}/ui/events?types=ui_tick")
        live = page.locator("#live")
        expect(live).to_have_attribute("data-state", "live")
        _ticks(event_store, range(3))
        items = page.locator("#events li")
        expect(items).to_have_count(3)
        server.stop()
        expect(live).to_have_attribute("data-state", "reconnecting")
        expect(live).to_contain_text("reconnecting")
        _ticks(event_store, range(3, 6))  # while the page has no connection
        server = Served(create_app(app_config), port)
        expect(items).to_have_count(6)
        expect(live).to_have_attribute("data-state", "live")
        _ticks(event_store, range(6, 7))
        expect(items).to_have_count(7)
        shown = page.eval_on_selector_all("#events li .summary", "els => els.map(e => e.textContent)")
        assert sorted(shown, key=lambda t: int(t.split("-")[1])) == [f"tick-{n}" for n in range(7)]
        shoot(page, "events")
    finally:
        server.stop()


def test_another_origin_cannot_act_through_the_browser(page, client: ModelBusClient, served: Served) -> None:  # type: ignore[no-untyped-def]
    key = add_record(client, "keep-me")
    hostile_server = FileServer().__enter__()  # another origin: a page of some other local server
    hostile = hostile_server.add_file("page.html", b"<!doctype html><title>elsewhere</title>", content_type="text/html")
    answers: list[tuple[str, int]] = []
    page.on("response", lambda r: answers.append((r.request.method, r.status)) if "/rename" in r.url else None)
    page.goto(hostile)
    outcome = page.evaluate("""async ([api, key]) => {
        const out = {};
        // a no-cors POST needs no preflight: the browser sends it, the API must refuse it
        try { const r = await fetch(`${api}/api/v2/models/i/${key}/rename`, {method: 'POST', mode: 'no-cors',
            headers: {'Content-Type': 'text/plain'}, body: JSON.stringify({name: 'pwned'})}); out.post = r.type; }
        catch (e) { out.post = String(e); }
        try { await fetch(`${api}/api/v2/models/i/${key}`, {method: 'DELETE'}); out.del = 'sent'; }
        catch { out.del = 'blocked'; }
        try { await (await fetch(`${api}/api/v2/models`)).json(); out.read = 'read'; }
        catch { out.read = 'unreadable'; }
        return out; }""", [served.url, key])
    assert outcome == {"post": "opaque", "del": "blocked", "read": "unreadable"}, outcome
    assert answers == [("POST", 403)], answers  # the guard refused it (not the body's content type: 422)
    assert client.get_model(key).name == "keep-me"
    hostile_server.__exit__(None, None, None)
    # the same rename from the page's own origin works
    ready(page, f"{served.url}/ui/models/{key}")
    field = page.locator('.field[data-field="name"]')
    field.locator("button.edit").click()
    field.locator("input[name=value]").fill("renamed here")
    field.locator("input[name=value]").press("Enter")
    expect(page.locator("#model-name")).to_have_text("renamed here")
    assert client.get_model(key).name == "renamed here"


def test_a_models_cover_shows_in_the_table_and_a_model_without_one_shows_its_initial(
        page, client: ModelBusClient, served: Served) -> None:  # type: ignore[no-untyped-def]
    import io

    from PIL import Image
    with_cover = add_record(client, "a-with-cover")
    add_record(client, "b-without-cover")
    image = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 40, 40)).save(image, format="PNG")
    client.set_cover(with_cover, image.getvalue())
    requested: list[str] = []
    page.on("request", lambda r: requested.append(r.url) if "/cover" in r.url else None)
    ready(page, f"{served.url}/ui")
    rows = page.locator("#models-table tbody tr")
    expect(rows).to_have_count(2)
    expect(rows.nth(0).locator("img.cover")).to_have_js_property("complete", True)
    expect(rows.nth(0).locator("img.cover")).to_be_visible()
    assert rows.nth(0).locator("img.cover").evaluate("img => img.naturalWidth") > 0  # the WebP thumbnail decoded
    expect(rows.nth(1).locator("img.cover")).to_have_count(0)  # no cover: no request, the initial letter
    expect(rows.nth(1).locator(".initial")).to_be_visible()
    assert requested and all(with_cover in url for url in requested), requested


def test_markup_in_names_and_events_stays_text(page, client: ModelBusClient, served: Served,
                                               event_store: RedisEventStore) -> None:  # type: ignore[no-untyped-def]
    evil = '<img src=x onerror="window.pwned=1">'
    key = add_record(client, evil, description=evil)
    ready(page, f"{served.url}/ui/events?types=ui_tick")
    expect(page.locator("#live")).to_have_attribute("data-state", "live")
    event_store.publish_activity("ui_tick", {"model_key": evil})
    expect(page.locator("#events li .summary")).to_have_text(evil)
    ready(page, f"{served.url}/ui?name=onerror")
    expect(page.locator("#models-table td.name a")).to_have_text(evil)
    ready(page, f"{served.url}/ui/models/{key}")
    expect(page.locator("#model-name")).to_have_text(evil)
    assert page.evaluate("window.pwned") is None
    assert page.locator("#content img:not(.cover)").count() == 0
