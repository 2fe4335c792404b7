"""The playground page at `/` in a real browser: Debian's chromium driven by Playwright, against the real
daemon serving the embedded emoji demo model on the CPU, with an API key set.

In CI (`CI=true`, which .ci/run sets after installing chromium) a missing browser fails these tests;
elsewhere they skip and say why. Screenshots go to $PYTEST_ARTIFACTS/playground (default: a pytest
temp directory, printed: `pytest -s` shows it).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from server_live import CPU_ENV, LiveServer

API_KEY = "playground-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
IMAGE_SIZE = 128  # the demo model's
SEED = 7
TIMEOUT_MS = 120_000  # a 2-core CI machine decodes a demo image in ~4-8 s; leave room for a busy one


def chromium_path() -> str:
    missing = None
    if importlib.util.find_spec("playwright") is None:
        missing = "playwright is not installed (pip install -e '.[dev]')"
    elif shutil.which("chromium") is None:
        missing = "Debian's chromium is not installed (apt-get install -y chromium)"
    if missing is None:
        return shutil.which("chromium")
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"the browser tests must run in CI: {missing}")
    pytest.skip(missing)


@pytest.fixture(scope="module")
def browser() -> Iterator:
    executable = chromium_path()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        # Playwright runs chromium without its sandbox (root in CI containers); small /dev/shm in containers
        b = p.chromium.launch(executable_path=executable, args=["--disable-dev-shm-usage"])
        yield b
        b.close()


@pytest.fixture(scope="module")
def demo_server(browser) -> Iterator[LiveServer]:
    # after `browser`: no server starts when the browser is missing.
    # max queue 4 and batch 8 (fixed: unset, the batch follows the memory free): 12 images a request at most, and a
    # full queue is a 429
    server = LiveServer(
        "playground",
        {"ADSA_API_KEYS": API_KEY, "ADSA_PREVIEW_EVERY_ROWS": "2", "ADSA_MAX_QUEUE": "4", "ADSA_MAX_BATCH_SIZE": "8"},
        model_env=CPU_ENV,
    )
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> Path:
    root = os.environ.get("PYTEST_ARTIFACTS")
    path = Path(root) / "playground" if root else tmp_path_factory.mktemp("playground")
    path.mkdir(parents=True, exist_ok=True)
    print(f"playground screenshots: {path}")
    return path


def open_playground(browser, server: LiveServer, card_changes: dict | None = None) -> tuple[Any, list[str]]:
    """A fresh tab (empty sessionStorage) on the playground, the API key typed in once, and the list its
    JavaScript errors go to. card_changes: fields of GET /v1/models to change on the way to the page
    (model kinds this suite cannot serve)."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    if card_changes:

        def change_card(route):
            response = route.fetch()
            if not response.ok:  # the 401 before the key is typed
                route.fulfill(response=response)
                return
            body = response.json()
            body["data"][0].update(card_changes)
            route.fulfill(response=response, json=body)

        context.route("**/v1/models", change_card)
    tab = context.new_page()
    errors: list[str] = []
    tab.on("pageerror", lambda e: errors.append(str(e)))
    tab.goto(server.url + "/")
    # the server has keys: the page's first GET /v1/models gets 401 and asks for one
    tab.wait_for_selector("#key-form:not([hidden])")
    tab.fill("#key-input", API_KEY)
    tab.click("#key-form button[type=submit]")
    tab.wait_for_selector("#generate:enabled")  # the model card is loaded
    return tab, errors


@pytest.fixture
def page(browser, demo_server):
    tab, errors = open_playground(browser, demo_server)
    yield tab
    tab.context.close()
    assert errors == [], f"JavaScript errors on the page: {errors}"


def choose_fox(tab) -> None:
    # an emoji pasted without its U+FE0F finds its class (the server reads prompts so too)
    tab.fill("#class-search", "\u2764")
    assert tab.locator("#class-list li[data-id]").all_inner_texts() == ["\u2764\ufe0f heavy black heart (#140)"]
    tab.fill("#class-search", "fox")
    option = tab.locator("#class-list li[data-id]").first
    assert option.inner_text() == "🦊 fox face (#539)"  # the demo's classes.json, emoji and name
    option.click()
    assert "fox face" in tab.inner_text("#class-chosen")
    tab.fill("#seed", str(SEED))


def set_range(tab, selector: str, value: float) -> None:
    tab.eval_on_selector(
        selector, "(el, v) => { el.value = v; el.dispatchEvent(new Event('input', {bubbles: true})); }", value
    )


# what a <img> decoded to: its natural size and how much of it is not blank
PIXELS_JS = """img => {
    const c = document.createElement('canvas');
    c.width = img.naturalWidth; c.height = img.naturalHeight;
    const ctx = c.getContext('2d');
    ctx.drawImage(img, 0, 0);
    const d = ctx.getImageData(0, 0, c.width, c.height).data;
    let lo = 255, hi = 0, inked = 0;
    for (let i = 0; i < d.length; i += 4) {
        const v = (d[i] + d[i + 1] + d[i + 2]) / 3;
        lo = Math.min(lo, v); hi = Math.max(hi, v);
        if (v < 230) inked++;
    }
    return {width: c.width, height: c.height, range: hi - lo, inked: inked / (c.width * c.height)};
}"""


def final_images(tab) -> list[dict]:
    imgs = tab.locator("img.final")
    return [imgs.nth(i).evaluate(PIXELS_JS) for i in range(imgs.count())]


def assert_real_image(pixels: dict) -> None:
    assert (pixels["width"], pixels["height"]) == (IMAGE_SIZE, IMAGE_SIZE)
    assert pixels["range"] > 100 and pixels["inked"] > 0.05, pixels  # an emoji on white, not a blank


def stat(pane, name: str) -> str:
    return pane.locator(f'[data-stat="{name}"]').inner_text()


def mib(text: str) -> float:
    value, unit = text.split()
    return float(value) * {"KiB": 2**-10, "MiB": 1, "GiB": 2**10}[unit]


def wait_for_metrics_strip(tab, server: LiveServer) -> None:
    """The live strip's images counter catches up with the server's own count within a few refreshes."""
    scraped = int(server.metrics()[("adsa_images_generated_total", ())])
    tab.wait_for_function(f"() => document.getElementById('m-images').textContent === '{scraped}'", timeout=15_000)


def api_image(server: LiveServer, body: dict) -> str:
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=120) as c:
        return c.post("/v1/generate", json=body).json()["data"][0]["b64_json"]


def test_generate_streams_rows_and_shows_kv_figures(page, demo_server):
    choose_fox(page)
    set_range(page, "#cfg", 1)  # CFG off: one sequence per image, twice as fast on the CPU
    assert page.inner_text("#cfg-out") == "off"
    # every <img> load on the page, so the row-by-row previews can be checked afterwards
    page.evaluate("""() => { window.loads = [];
        document.addEventListener('load', e => e.target.tagName === 'IMG' &&
            window.loads.push([e.target.naturalWidth, e.target.naturalHeight]), true); }""")
    # the same settings through the API, at the same time (an image depends only on its own seed)
    body = {"class_label": 539, "seed": SEED, "cfg_scale": 1.0, "policy": "line", "kv_budget": 128}  # the defaults
    with ThreadPoolExecutor(1) as pool:
        reference = pool.submit(api_image, demo_server, body)
        page.click("#generate")
        page.wait_for_selector("img.final", timeout=TIMEOUT_MS)
    page.wait_for_function("() => !document.body.classList.contains('running')", timeout=TIMEOUT_MS)

    [pixels] = final_images(page)
    assert_real_image(pixels)
    loads = page.evaluate("window.loads")
    partial = [h for w, h in loads if w == IMAGE_SIZE and h < IMAGE_SIZE]
    assert partial and partial == sorted(partial), loads  # previews of the finished rows, growing

    pane = page.locator(".pane")
    assert re.fullmatch(r"\d+\.\d\d s", stat(pane, "ttfp")) and re.fullmatch(r"\d+\.\d\d s", stat(pane, "total"))
    assert stat(pane, "budget") == "128 / 256" and stat(pane, "peak") == "128"  # the demo's default: half
    assert int(stat(pane, "evictions").replace(",", "")) > 0 and mib(stat(pane, "kv-bytes")) > 0

    # the page asked for exactly these settings: the API gave the same bytes for them
    assert page.get_attribute("img.final", "src") == f"data:image/png;base64,{reference.result()}"

    wait_for_metrics_strip(page, demo_server)
    assert page.inner_text("#m-waiting") == "0" and re.match(r"\d+\.\d %", page.inner_text("#m-kv"))

    # the key is kept for the tab: a reload goes straight to the model
    page.reload()
    page.wait_for_selector("#class-list li[data-id]")
    assert page.is_hidden("#key-form") and page.inner_text("#model-line").startswith("emoji-demo")


def test_sampling_settings_start_at_the_models_and_reach_the_server(page, demo_server):
    card = httpx.get(f"{demo_server.url}/v1/models", headers=AUTH).json()["data"][0]
    shown = [float(page.input_value(f"#{name}")) for name in ("temperature", "top-k", "top-p")]
    defaults = card["sampling_defaults"]  # the demo's: temperature 0.7, top-k 0, top-p 1.0
    assert shown == [defaults["temperature"], defaults["top_k"], defaults["top_p"]]
    choose_fox(page)
    set_range(page, "#cfg", 1)
    page.click("#sampling summary")
    page.fill("#temperature", "0.9")
    page.fill("#top-k", "50")
    page.fill("#top-p", "0.95")
    with page.expect_request("**/v1/generate") as request:
        page.click("#generate")
    sent = request.value.post_data_json
    assert (sent["temperature"], sent["top_k"], sent["top_p"]) == (0.9, 50, 0.95)
    page.wait_for_selector("img.final", timeout=TIMEOUT_MS)
    # what the server made of them: the API's image for the same body, byte for byte
    body = {k: v for k, v in sent.items() if k != "stream"}
    assert page.get_attribute("img.final", "src") == f"data:image/png;base64,{api_image(demo_server, body)}"
    page.fill("#top-p", "1.5")  # outside (0, 1]: the browser refuses it before anything is sent
    page.click("#compare")
    assert page.eval_on_selector("#top-p", "el => el.validity.rangeOverflow")
    assert page.locator(".pane").count() == 1  # the run before stays; compare's two panes never came


def test_compare_dense_with_sparse(page, demo_server, artifacts):
    choose_fox(page)
    assert page.inner_text("#compare") == "Compare line with dense"
    page.click("#compare")
    page.wait_for_selector("#verdict:not([hidden])", timeout=2 * TIMEOUT_MS)

    images = final_images(page)
    assert len(images) == 2
    for pixels in images:
        assert_real_image(pixels)
    dense, sparse = page.locator(".pane").nth(0), page.locator(".pane").nth(1)
    assert page.inner_text(".pane:nth-child(1) .pane-title") == "dense"
    assert page.inner_text(".pane:nth-child(2) .pane-title") == "line · 128 tokens"
    assert stat(dense, "budget") == "256 / 256" and stat(dense, "evictions") == "0"
    assert stat(sparse, "budget") == "128 / 256" and stat(sparse, "evictions") != "0"
    # half the budget reserves half the pool pages: the two memory figures say so
    assert mib(stat(sparse, "kv-bytes")) == pytest.approx(mib(stat(dense, "kv-bytes")) / 2, rel=0.02)
    assert "50 % of dense's KV memory" in page.inner_text("#verdict")

    wait_for_metrics_strip(page, demo_server)
    page.screenshot(path=artifacts / "compare-desktop.png", full_page=True)
    # phone width: one column, nothing wider than the screen
    page.set_viewport_size({"width": 390, "height": 844})
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    page.screenshot(path=artifacts / "compare-phone.png", full_page=True)


def images_in_engine(server: LiveServer) -> float:
    """Images waiting or running on the server, from its /metrics."""
    metrics = server.metrics()
    return sum(metrics.get((name, ()), 0.0) for name in ("adsa_num_requests_waiting", "adsa_num_requests_running"))


def wait_for_queue(server: LiveServer, images: int, timeout: float = 60.0) -> None:
    """Until `images` images are waiting or running on the server."""
    deadline = time.monotonic() + timeout
    while images_in_engine(server) < images:
        assert time.monotonic() < deadline, f"{images} images never queued"
        time.sleep(0.02)


def test_errors_are_readable(page, demo_server, artifacts):
    choose_fox(page)
    # the budget slider stops at the smallest budget the server accepts (the model card's; the demo's 19 of 256)
    card = httpx.get(f"{demo_server.url}/v1/models", headers=AUTH).json()["data"][0]
    assert page.get_attribute("#budget", "min") == str(card["min_budget"]) == "19"
    set_range(page, "#budget", 1)
    assert page.inner_text("#budget-out") == "19 of 256 tokens (7 %)"
    # a seed that a JavaScript number cannot hold exactly is refused before anything is sent (it would go rounded)
    page.fill("#seed", "9007199254740993")
    page.click("#compare")
    assert page.eval_on_selector("#seed", "el => el.validity.rangeOverflow")
    assert page.locator(".pane").count() == 0
    page.fill("#seed", str(SEED))
    # 422: settings the model cannot run. The page offers none, so one is made on the way (a budget of 1 token):
    # what the page shows is the server's own answer.
    page.route("**/v1/generate", lambda route: route.continue_(
        post_data=json.dumps({**route.request.post_data_json, "kv_budget": 1})))
    page.click("#generate")
    page.wait_for_selector("#error:not([hidden])")
    assert page.get_attribute("#error", "data-status") == "422"
    assert re.fullmatch(
        r"The server rejected these settings: kv budget 1 token must be larger than prefix \d+ \+ local window \d+ "
        r"\(an integer counts tokens: the whole cache is 1\.0\)\.",
        page.inner_text("#error"),
    )
    page.unroute("**/v1/generate")
    # the page asks for no more images than the server can ever queue at once (its queue of 4 and batch of 8)
    assert page.get_attribute("#n", "max") == "12"
    # 429: the queue is full right now. Another client's request fills it, the page's one image finds no room.
    set_range(page, "#budget", 128)
    capacity = 12
    with ThreadPoolExecutor(1) as pool:
        other = pool.submit(httpx.post, f"{demo_server.url}/v1/generate", headers=AUTH, timeout=300,
                            json={"class_label": 539, "n": capacity})
        wait_for_queue(demo_server, capacity)
        page.fill("#n", "1")
        page.click("#generate")
        page.wait_for_selector("#error[data-status='429']")
        assert re.fullmatch(
            r"The server is busy \(queue full\): \d+ images are waiting and this request adds 1 \(room for 0\)\. "
            r"Try again in \d+ s\.",  # the server's words, then the page's
            page.inner_text("#error"),
        )
        assert page.locator(".pane").count() == 0  # the refused request left no empty frames behind
        page.screenshot(path=artifacts / "error-429.png")
        assert other.result().status_code == 200  # the other client's images were never at risk
    # 401: a wrong key is refused and the page asks again
    page.click("#key-button")
    page.fill("#key-input", "wrong-key")
    page.click("#key-form button[type=submit]")
    page.wait_for_selector("#error[data-status='401']")
    assert page.inner_text("#error").startswith("The server needs a valid API key: missing or invalid API key")
    assert page.is_visible("#key-form") and page.inner_text("#key-reason") == "The key was refused; enter another."


def test_keyboard_picks_classes_and_a_new_key_keeps_the_settings(page, artifacts):
    """Enter in the search picks its first match (and sends nothing); the list is one tab stop with arrow keys
    inside; Escape closes the key form; a key typed again reloads the model card but keeps every setting."""
    page.focus("#class-search")
    page.keyboard.type("fox")
    page.keyboard.press("Enter")
    assert "fox face (#539)" in page.inner_text("#class-chosen")
    assert page.locator(".pane").count() == 0  # no run started with the class chosen before
    page.fill("#class-search", "face")
    assert page.locator("#class-list li[tabindex='0']").count() == 1
    page.focus("#class-search")
    page.keyboard.press("ArrowDown")
    page.keyboard.press("ArrowDown")
    second = page.locator("#class-list li[data-id]").nth(1)
    assert second.evaluate("li => li === document.activeElement")
    page.keyboard.press("Enter")
    assert second.inner_text().split(" ", 1)[1] in page.inner_text("#class-chosen")
    assert second.get_attribute("tabindex") == "0" and page.locator("#class-list li[tabindex='0']").count() == 1
    page.keyboard.press("Tab")  # out of the list in one step, to the seed (the chosen class is the list's stop)
    assert page.evaluate("document.activeElement.id") == "seed"
    page.screenshot(path=artifacts / "keyboard.png")
    chosen = page.inner_text("#class-chosen")

    page.select_option("#policy", "window")
    set_range(page, "#budget", 40)
    set_range(page, "#cfg", 6)
    page.fill("#seed", "2147483647")  # a random seed's largest
    page.click("#key-button")
    page.keyboard.press("Escape")
    assert page.is_hidden("#key-form")
    page.click("#key-button")
    page.fill("#key-input", API_KEY)
    with page.expect_response("**/v1/models"):
        page.click("#key-form button[type=submit]")
    page.wait_for_selector("#generate:enabled")
    settings = page.evaluate("""() => ['policy', 'budget', 'cfg', 'seed', 'class-search']
        .map((id) => document.getElementById(id).value)""")
    assert settings == ["window", "40", "6", "2147483647", "face"]
    assert page.inner_text("#class-chosen") == chosen
    assert page.locator("#class-list li[data-id]").nth(1).inner_text() == second.inner_text()  # still filtered
    # the last image's seed (seed + n - 1) stays one a JavaScript number holds exactly
    page.fill("#n", "4")
    assert page.get_attribute("#seed", "max") == str(2**53 - 1 - 3)


def test_a_run_can_be_cancelled_and_the_server_stops_its_images(page, demo_server):
    cancelled = ("adsa_requests_total", (("status", "cancelled"),))
    before = demo_server.metrics().get(cancelled, 0.0)
    choose_fox(page)
    page.fill("#n", "4")
    assert page.is_hidden("#cancel")
    page.click("#generate")
    page.wait_for_selector("#cancel:visible")
    page.wait_for_function("() => [...document.querySelectorAll('progress')].some((p) => p.value > 0)",
                           timeout=TIMEOUT_MS)
    page.focus("#class-search")
    page.keyboard.press("Escape")  # in the search: clears it (the browser's), the run goes on
    assert page.is_visible("#cancel") and page.is_hidden("#verdict")
    page.focus("#cancel")
    page.keyboard.press("Enter")
    page.wait_for_selector("#verdict:not([hidden])")
    assert page.inner_text("#verdict") == "Cancelled: the server stopped the images that were not finished."
    assert page.is_hidden("#error") and page.is_hidden("#cancel") and page.is_enabled("#generate")
    assert page.evaluate("document.activeElement.id") == "generate"  # the keyboard's place is not lost
    assert "cancelled" in page.locator("figcaption").all_inner_texts()
    # the closed stream cancelled the images on the server: counted as cancelled, and nothing runs or waits
    deadline = time.monotonic() + 30
    while demo_server.metrics().get(cancelled, 0.0) == before or images_in_engine(demo_server) > 0:
        assert time.monotonic() < deadline, "the server kept the cancelled images"
        time.sleep(0.05)
    # Escape elsewhere cancels, as the button does
    page.click("#generate")
    page.wait_for_selector("#cancel:visible")
    page.focus("#generate")
    page.keyboard.press("Escape")
    page.wait_for_selector("#verdict:not([hidden])")


def test_a_stream_that_breaks_is_a_network_error_not_the_pages(page):
    """The server gone mid-stream (the connection cut after some events): the page says so in its network
    sentence. The break is made in the page's fetch: a stream that errors after its first event."""
    choose_fox(page)
    page.evaluate("""() => {
        const realFetch = window.fetch;
        window.fetch = (url, init) => {
            if (!String(url).endsWith('/v1/generate')) return realFetch(url, init);
            const body = new ReadableStream({
                start(c) { c.enqueue(new TextEncoder().encode(
                    'event: progress\\ndata: {"index": 0, "tokens_done": 8, "total": 64}\\n\\n')); },
                pull(c) { return new Promise(() => setTimeout(() => c.error(new TypeError('network error')), 50)); },
            });
            return Promise.resolve(new Response(body, {headers: {'Content-Type': 'text/event-stream'}}));
        };
    }""")
    page.click("#generate")
    page.wait_for_selector("#error:not([hidden])")
    assert page.inner_text("#error") == (
        "Network error: the connection to the server broke during the stream (network error).")


def test_error_bodies_of_both_shapes_read_the_same(page):
    """The API's {"error", "type"} and the OpenAI-style {"error": {"message", "type"}} read alike."""
    messages = page.evaluate("""async () => {
        const m = await import('/static/playground.js');
        return [
            m.describe(m.errorFromBody(429, {error: 'queue is full', type: 'queue_full'}, '3')),
            m.describe(m.errorFromBody(429, {error: {message: 'queue is full', type: 'queue_full'}}, '3')),
            m.describe(m.errorFromBody(503, {error: {message: 'the server is shutting down', code: 'draining'}})),
            m.describe(m.errorFromBody(null, {error: 'deadline exceeded', type: 'deadline_exceeded', index: 0})),
            // an error event after the stream started (no HTTP status): its code says which status it stands for
            m.describe(m.errorFromBody(null, {error: {message: 'deadline exceeded', type: 'server_error',
                                                      code: 'deadline_exceeded'}, index: 0})),
            m.describe(m.errorFromBody(null, {error: {message: 'boom', type: 'server_error', code: 'internal_error'},
                                              index: 1})),
        ];
    }""")
    assert messages == [
        "The server is busy (queue full): queue is full. Try again in 3 s.",
        "The server is busy (queue full): queue is full. Try again in 3 s.",
        "The server is not available right now: the server is shutting down.",
        "The request ran past its deadline: deadline exceeded.",
        "The request ran past its deadline: deadline exceeded.",
        "The server stopped the request: boom (server_error).",
    ]


def test_imagenet_names_and_text_prompts(browser, demo_server):
    """ImageNet checkpoints come without class names and text models take a prompt: the demo's own card
    with those fields changed drives the page's other branches against the real server."""
    tab, errors = open_playground(browser, demo_server, {"num_classes": 1000, "classes": None})
    tab.fill("#class-search", "golden retriever")
    assert tab.locator("#class-list li[data-id]").all_inner_texts() == ["golden retriever (#207)"]
    tab.fill("#class-search", "ｇｏｌｄｅｎ ｒｅｔｒｉｅｖｅｒ")  # full-width
    assert tab.locator("#class-list li[data-id]").all_inner_texts() == ["golden retriever (#207)"]
    tab.fill("#class-search", "")
    assert tab.inner_text("#class-list li.more") == "… 940 more: refine the search"  # 60 listed of 1,000
    tab.context.close()

    tab, more_errors = open_playground(browser, demo_server, {"model_type": "t2i"})
    assert tab.is_hidden("#class-field") and tab.is_visible("#prompt")
    tab.fill("#prompt", "a red fox in the snow")
    tab.click("#generate")
    tab.wait_for_selector("#error[data-status='422']")  # the prompt reached the (class-conditional) server
    assert "this is a class-conditional model: give class_label or class_labels, not a prompt" in tab.inner_text(
        "#error"
    )
    tab.context.close()
    assert errors + more_errors == []
