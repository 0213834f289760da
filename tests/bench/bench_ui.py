"""The page at /ui with 10,000 models: server time to the first byte of the models view (p50, goal
<= 50 ms; beside the JSON route's for the same page of rows), the bytes of that first page with its
scripts and stylesheet (goal <= 300 KB), and an event's way from its append to the page's DOM (p50, goal
<= 100 ms) in Debian's chromium."""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from modelbus.services.api import create_app
from tests.api.conftest import serve
from tests.bench.bench_surfaces import MODELS, _client, _seed
from tests.bench.common import bench_redis, percentiles, ratio_line, scale

CHROMIUM = "/usr/bin/chromium"
STATIC = ("ui.css", "ui.js", "api.js", "stream.js", "favicon.svg")


def _ttfb(http: httpx.Client, url: str, params: dict[str, str | int] | None = None) -> float:
    started = time.perf_counter()
    with http.stream("GET", url, params=params) as r:
        next(r.iter_raw())
        assert r.status_code == 200, r.status_code
    return time.perf_counter() - started


def bench_models_view(base: str) -> None:
    rounds = scale(60)
    with httpx.Client(base_url=base, timeout=60) as http:
        http.get("/ui")  # the projection catches up once
        page, api = [], []
        for _ in range(rounds):
            page.append(_ttfb(http, "/ui"))
            api.append(_ttfb(http, "/api/v2/models", {"limit": 50}))
        (p50, p99), (a50, _) = percentiles(page), percentiles(api)
        ratio_line("GET /ui (10,000 models) TTFB p50", p50 * 1000, a50 * 1000, "ms", "<= 50 ms",
                   higher_is_better=False)
        print(f"{'GET /ui (10,000 models) TTFB p99':<48} {p99 * 1000:.1f} ms", flush=True)
        document = len(http.get("/ui").content)
        assets = sum(len(http.get(f"/ui/static/{name}").content) for name in STATIC)
        print(f"{'first page bytes (document + static)':<48} {document / 1024:.1f} KB + {assets / 1024:.1f} KB = "
              f"{(document + assets) / 1024:.1f} KB  (goal <= 300 KB)", flush=True)


def bench_event_to_dom(base: str, client_store) -> None:  # type: ignore[no-untyped-def]
    if not Path(CHROMIUM).exists():
        print(f"event append -> DOM: skipped (no {CHROMIUM})", flush=True)
        return
    from playwright.sync_api import sync_playwright
    n = scale(60)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page()
        page.goto(f"{base}/ui/events?types=ui_bench")
        page.wait_for_selector("#live[data-state=live]")
        page.evaluate("""() => { window.lags = [];
            new MutationObserver((changes) => { const now = Date.now();
                for (const c of changes) for (const li of c.addedNodes)
                    if (li.dataset) window.lags.push(now - Date.parse(li.dataset.time)); })
            .observe(document.getElementById('events'), {childList: true}); }""")
        for i in range(n):
            client_store.publish_activity("ui_bench", {"i": i})
            time.sleep(0.05)  # one at a time: the latency of one event, not of a burst
        page.wait_for_function(f"window.lags.length >= {n}", timeout=60_000)
        lags = page.evaluate("window.lags")
        browser.close()
    lags = [float(x) for x in lags]
    print(f"{'event append -> DOM p50':<48} {statistics.median(lags):.1f} ms  p99 {percentiles(lags)[1]:.1f} ms  "
          f"({len(lags)} events; goal p50 <= 100 ms)", flush=True)


def main() -> int:
    from modelbus.events.logs import configure_logging
    configure_logging("console", "WARNING")
    with bench_redis() as url:
        client = _client(url)
        _seed(client, MODELS)
        server, thread, base = serve(create_app(client.config, client=client))
        try:
            bench_models_view(base)
            bench_event_to_dom(base, client.store)
        finally:
            server.should_exit = True
            thread.join(10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
