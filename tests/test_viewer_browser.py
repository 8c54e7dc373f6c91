"""The viewer at /ui/ in headless Chromium (Playwright), against a real server on the default model.

The server requires an API key; each test opens the page, types the key into it, works one
panel the way a user would, and compares what the page shows with the same request made over
HTTP here: token colours and values (read back from data attributes and computed styles), a
heatmap cell's details, the attention panel's axis labels and sink shares, and the steer
panel's two continuations. Every page must load and run with no console error. Screenshots
of each panel are saved under the pytest tmp folder (`viewer-screenshots`).

Debian: `apt-get install -y chromium` provides /usr/bin/chromium; `pip install playwright`
the driver (its own browser downloads are not needed).
"""

from __future__ import annotations

import math
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional

import matplotlib
import numpy as np
import pytest
import requests
from neuroscope_server import running_server

from mlx_engine.loading import DEFAULT_MODEL_DIR
from mlx_engine.wire.codec import decode_capture, decode_capture_extras

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed: pip install playwright (the test extra)")
CHROMIUM = Path("/usr/bin/chromium")
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update", "--no-first-run"]
KEY = "viewer-browser-key"
PROMPT = "Write a Python function that counts the lines in a text file."
MAX_TOKENS = 12
RTOL = 1e-5  # streamed and whole captures are the same float32 values; norms differ in summation order only
VIRIDIS = np.round(np.asarray(matplotlib.colormaps["viridis"](np.arange(256)))[:, :3] * 255).astype(int)
MARKS = {"\n": "↵", "\t": "⇥", "\r": "␍"}

pytestmark = [
    pytest.mark.skipif(not CHROMIUM.exists(), reason="chromium not installed: .ci/run installs it with apt-get"),
    pytest.mark.skipif(not (DEFAULT_MODEL_DIR / "config.json").exists(), reason="the embedded default model is not in this checkout"),
]


def label(token: str) -> str:
    """tokens.mjs `label`: a token as an axis label."""
    marked = "".join(MARKS.get(c, c) for c in token)
    lead = len(marked) - len(marked.lstrip(" "))
    trail = len(marked) - len(marked.rstrip(" ")) if len(marked) > lead else 0
    return "␣" * lead + marked[lead : len(marked) - trail] + "␣" * trail or "∅"


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The default model behind a key, with a model root holding a second copy to load and unload."""
    root = tmp_path_factory.mktemp("model-root")
    shutil.copytree(DEFAULT_MODEL_DIR, root / "second-copy")
    with running_server("default", api_key=KEY, model_roots=(root,)) as url:
        yield url


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=FLAGS)
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("viewer-screenshots")


@pytest.fixture
def page(browser: Any, server: str) -> Iterator[Any]:
    """The viewer, opened and given the key; fails the test on any console error."""
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    tab = context.new_page()
    errors: list[str] = []
    tab.on("console", lambda m: errors.append(f"console.{m.type}: {m.text}") if m.type == "error" else None)
    tab.on("pageerror", lambda e: errors.append(f"page error: {e}"))
    tab.goto(server + "/ui/")
    tab.wait_for_selector("body[data-ready=true]")
    assert tab.get_attribute("body", "data-needs-key") == "true"
    tab.fill("#api-key", KEY)
    tab.press("#api-key", "Enter")
    wait_until(tab, "document.querySelector('#model-select').value === 'default'")
    wait_until(tab, "document.querySelector('#gen-layer').options.length > 0")
    yield tab
    context.close()
    assert not errors, errors


def wait_until(page: Any, expression: str, timeout: float = 30.0) -> None:
    """Poll a JavaScript expression until it is truthy. (Playwright's wait_for_function evaluates
    its predicate with eval, which the viewer's Content Security Policy refuses, as it should.)"""
    deadline = time.monotonic() + timeout
    while not page.evaluate(expression):
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {expression}")
        time.sleep(0.05)


def post(server: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
    response = requests.post(server + path, json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()


def chat(server: str, hooks: list[Any], **extra: Any) -> dict[str, Any]:
    """The request the page's shared form describes (its defaults with MAX_TOKENS), whole."""
    body = {"model": "default", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": MAX_TOKENS,
            "temperature": 0, "activation_hooks": hooks, "activation_format": "base64", **extra}
    return post(server, "/v1/chat/completions/with_activations", body)


def by_position(captures: list[dict[str, Any]], read: Any) -> dict[int, Optional[float]]:
    out: dict[int, Optional[float]] = {}
    for capture in captures:
        start, stop = capture["positions"]
        values = read(decode_capture(capture).astype(np.float64), capture)
        out.update(zip(range(start, stop), values))
    return out


def rgb(css: str) -> tuple[int, ...]:
    return tuple(int(v) for v in css[css.index("(") + 1 : css.index(")")].split(",")[:3])


def open_panel(page: Any, name: str) -> None:
    page.click(f"#tab-{name}")
    page.wait_for_selector(f"#panel-{name}:not([hidden])")


def click_cell(page: Any, selector: str, x: int, y: int) -> None:
    """Click the heatmap cell at category (x, y), found with ECharts' own coordinate conversion."""
    point = page.evaluate(
        """async ([selector, x, y]) => {
            const echarts = await import("/ui/vendor/echarts/echarts.esm.min.mjs");
            const el = document.querySelector(selector);
            const [px, py] = echarts.getInstanceByDom(el).convertToPixel({ seriesIndex: 0 }, [String(x), String(y)]);
            const box = el.getBoundingClientRect();
            return [box.left + px, box.top + py];
        }""",
        [selector, x, y],
    )
    page.mouse.click(*point)


# ----------------------------------------------------------------------------- panels


def run_generation(page: Any) -> list[dict[str, Any]]:
    page.fill("#req-max-tokens", str(MAX_TOKENS))
    # Count generated tokens each time the token view changes: a stream adds them over time.
    page.evaluate("""() => {
        window.__counts = [];
        const view = document.querySelector('#gen-tokens');
        new MutationObserver(() => window.__counts.push(view.querySelectorAll('.tok[data-source=generated]').length))
            .observe(view, { childList: true });
    }""")
    page.click("#gen-run")
    page.wait_for_selector("#gen-tokens[data-state=done]")
    return page.eval_on_selector_all(
        "#gen-tokens .tok",
        "spans => spans.map(s => ({position: Number(s.dataset.position), source: s.dataset.source, token: s.dataset.token, "
        "value: s.dataset.value === '' || s.dataset.value === undefined ? null : Number(s.dataset.value), bg: getComputedStyle(s).backgroundColor}))",
    )


def check_colours(page: Any, spans: list[dict[str, Any]], expected: dict[int, Optional[float]]) -> None:
    """Each token's value equals the captured one, and its colour is viridis of it on the page's scale."""
    low, high = float(page.get_attribute("#gen-tokens", "data-min")), float(page.get_attribute("#gen-tokens", "data-max"))
    finite = [v for v in expected.values() if v is not None]
    assert math.isclose(low, min(finite), rel_tol=RTOL) and math.isclose(high, max(finite), rel_tol=RTOL)
    for span in spans[:-1]:
        want = expected[span["position"]]
        if want is None:
            assert span["value"] is None, span
            continue
        assert math.isclose(span["value"], want, rel_tol=RTOL, abs_tol=1e-6), (span, want)
        index = min(255, max(0, math.floor((span["value"] - low) / (high - low) * 256)))
        assert rgb(span["bg"]) == tuple(VIRIDIS[index]), (span, index)
    assert spans[-1]["value"] is None  # the last token is never fed back through the model


def test_generate_streams_tokens_coloured_by_the_captured_norm(page: Any, server: str, shots: Path) -> None:
    page.select_option("#gen-scalar", "norm")
    page.select_option("#gen-layer", "2")
    spans = run_generation(page)
    counts = page.evaluate("window.__counts")
    assert len({c for c in counts if c > 0}) >= 3, f"the tokens did not arrive one by one: {counts}"
    reference = chat(server, [{"layer_name": 2, "component": "residual"}])
    tokens = reference["prompt_tokens_text"] + reference["generated_tokens_text"]
    assert [s["token"] for s in spans] == tokens
    n_prompt = len(reference["prompt_tokens_text"])
    assert [s["source"] for s in spans] == ["prompt"] * n_prompt + ["generated"] * MAX_TOKENS
    assert page.get_attribute("#gen-tokens", "data-boundary") == str(n_prompt)
    assert page.evaluate("document.querySelector('#gen-tokens .boundary').previousElementSibling.dataset.position") == str(n_prompt - 1)
    norms = by_position(reference["activations"]["layers.2.residual"], lambda a, c: np.linalg.norm(a, axis=-1))
    check_colours(page, spans, norms)
    page.hover(f"#gen-tokens .tok[data-position='{n_prompt}']")
    assert page.text_content("#gen-readout").startswith(f"position {n_prompt} · generated ·")
    assert page.text_content("#gen-content") == reference["choices"][0]["message"]["content"]
    page.screenshot(path=str(shots / "generate.png"), full_page=True)


def test_generate_colours_by_one_expert_neuron(page: Any, server: str) -> None:
    page.select_option("#gen-scalar", "neuron")
    page.select_option("#gen-component", "expert_post")
    page.select_option("#gen-layer", "1")
    page.fill("#gen-neuron", "5")
    page.fill("#gen-expert", "1")
    spans = run_generation(page)
    hook = {"layer_name": 1, "component": "expert_post", "indices": [5]}
    reference = chat(server, [hook])

    def expert_one(values: np.ndarray, capture: dict[str, Any]) -> list[Optional[float]]:
        experts = decode_capture_extras(capture)["experts"]  # [T, k]: which expert each row is
        return [float(v[list(e).index(1), 0]) if 1 in list(e) else None for v, e in zip(values, experts)]

    expected = by_position(reference["activations"]["layers.1.expert_post"], expert_one)
    assert any(v is None for v in expected.values()) and any(v is not None for v in expected.values())
    assert [c["shape"][-1] for c in reference["activations"]["layers.1.expert_post"]] == [1] * MAX_TOKENS  # one column per step
    check_colours(page, spans, expected)


def test_layers_heatmap_cell_opens_that_positions_details(page: Any, server: str, shots: Path) -> None:
    page.fill("#req-max-tokens", str(MAX_TOKENS))
    open_panel(page, "layers")
    page.click("#layers-run")
    page.wait_for_selector("#layers-heatmap[data-x-labels]")
    reference = chat(server, [{"layer_name": i, "component": "residual"} for i in range(4)])
    tokens = reference["prompt_tokens_text"] + reference["generated_tokens_text"]
    positions = len(tokens) - 1
    assert page.eval_on_selector("#layers-heatmap", "e => JSON.parse(e.dataset.xLabels)") == [label(t) for t in tokens[:positions]]
    assert page.eval_on_selector("#layers-heatmap", "e => JSON.parse(e.dataset.yLabels)") == ["0", "1", "2", "3"]
    assert page.get_attribute("#layers-heatmap", "data-boundary") == str(len(reference["prompt_tokens_text"]))
    drawn = page.eval_on_selector_all("#layers-heatmap svg text", "ts => ts.map(t => t.textContent)")
    assert {"layer", "token (position, left to right)", label(tokens[positions - 1])} <= set(drawn)
    position = len(reference["prompt_tokens_text"]) + 2
    click_cell(page, "#layers-heatmap", position, 1)
    page.wait_for_selector(f"#layers-details table[data-position='{position}']")
    shown = page.eval_on_selector_all("#layers-details tr[data-layer]", "rows => rows.map(r => [Number(r.dataset.layer), Number(r.dataset.value)])")
    for layer, value in shown:
        norms = by_position(reference["activations"][f"layers.{layer}.residual"], lambda a, c: np.linalg.norm(a, axis=-1))
        assert math.isclose(value, norms[position], rel_tol=RTOL), (layer, value, norms[position])
    assert [layer for layer, _ in shown] == [0, 1, 2, 3]
    assert label(tokens[position]) in page.text_content("#layers-details h3")
    page.screenshot(path=str(shots / "layers.png"), full_page=True)


def test_attention_labels_are_the_tokens_and_sinks_are_shown(page: Any, server: str, shots: Path) -> None:
    page.fill("#req-max-tokens", str(MAX_TOKENS))
    open_panel(page, "attention")
    page.select_option("#attn-layer", "1")
    page.click("#attn-run")
    page.wait_for_selector("#attn-heatmap[data-x-labels]")
    page.select_option("#attn-head", "2")
    page.wait_for_selector("#attn-heatmap[data-head='2']")
    reference = chat(server, [{"layer_name": 1, "component": "attention_pattern"}])
    tokens = reference["prompt_tokens_text"] + reference["generated_tokens_text"]
    labels = [label(t) for t in tokens[:-1]]
    assert page.eval_on_selector("#attn-heatmap", "e => JSON.parse(e.dataset.xLabels)") == labels
    assert page.eval_on_selector("#attn-heatmap", "e => JSON.parse(e.dataset.yLabels)") == labels
    drawn = set(page.eval_on_selector_all("#attn-heatmap svg text", "ts => ts.map(t => t.textContent)"))
    assert {"key token", "query token", labels[0], labels[-1]} <= drawn
    sinks = by_position(reference["activations"]["layers.1.attention_pattern"], lambda a, c: 1.0 - a[2].sum(axis=-1))
    shown = page.eval_on_selector("#attn-sink-chart", "e => JSON.parse(e.dataset.sinkShare)")
    np.testing.assert_allclose(shown, [sinks[p] for p in range(len(labels))], rtol=1e-4, atol=1e-6)
    assert "excludes the sink's share" in page.text_content("#attn-sinks")
    page.screenshot(path=str(shots / "attention.png"), full_page=True)


def steer_and_read(page: Any) -> dict[str, list[str]]:
    page.click("#steer-run")
    wait_until(page, "document.querySelector('#steer-steered').dataset.tokens !== undefined && document.querySelector('#status').textContent === 'Both runs done.'")
    return {name: page.eval_on_selector(f"#steer-{name}", "e => JSON.parse(e.dataset.tokens)") for name in ("unsteered", "steered")}


def test_steer_continuations_equal_the_same_requests_over_http(page: Any, server: str, shots: Path) -> None:
    page.fill("#req-max-tokens", str(MAX_TOKENS))
    open_panel(page, "steer")
    compare = [{"layer_name": 3, "component": "residual"}]
    # A steering vector built in the page, and the same one built here.
    page.select_option("#steer-layer", "2")
    page.click("#steer-build")
    page.wait_for_selector("#steer-vector[data-norm]")
    shown = steer_and_read(page)
    vector = post(server, "/v1/steering/vectors", {"layer_name": 2, "component": "residual", "format": "base64", "position": "mean",
                                                   "positive": ["x = [1, 2, 3, 4, 5]", "port = 8080"], "negative": ["import os", "return self._name"]})
    assert math.isclose(float(page.get_attribute("#steer-vector", "data-norm")), vector["norm"], rel_tol=1e-6)
    steered = chat(server, compare, interventions=[{**vector["intervention"], "scale": 8, "positions": "all"}])
    plain = chat(server, compare)
    assert shown == {"unsteered": plain["generated_tokens_text"], "steered": steered["generated_tokens_text"]}
    assert shown["steered"] != shown["unsteered"]
    assert page.text_content("#steer-steered") == "".join(steered["generated_tokens_text"])
    a = by_position(plain["activations"]["layers.3.residual"], lambda x, c: list(x))
    b = by_position(steered["activations"]["layers.3.residual"], lambda x, c: list(x))
    diffs = page.eval_on_selector("#steer-diff", "e => JSON.parse(e.dataset.values)")
    want = [float(np.linalg.norm(np.subtract(b[p], a[p]))) for p in range(len(diffs))]
    np.testing.assert_allclose(diffs, want, rtol=1e-4)
    page.screenshot(path=str(shots / "steer.png"), full_page=True)
    # Zero-ablating two heads of layer 1 on the generated positions.
    page.select_option("#steer-kind", "zero")
    page.select_option("#steer-layer", "1")
    page.check("#steer-heads input[value='1']")
    page.select_option("#steer-positions", "generated")
    shown = steer_and_read(page)
    zeroed = chat(server, compare, interventions=[{"layer_name": 1, "component": "z", "op": "zero", "heads": [0, 1], "positions": "generated"}])
    assert shown == {"unsteered": plain["generated_tokens_text"], "steered": zeroed["generated_tokens_text"]}


def test_models_panel_shows_memory_live_and_loads_and_unloads(page: Any, server: str, shots: Path) -> None:
    open_panel(page, "models")
    page.wait_for_selector("#models-memory dd[data-key='mlx-active']")
    memory = requests.get(server + "/v1/memory", headers={"Authorization": f"Bearer {KEY}"}, timeout=30).json()
    rss = float(page.get_attribute("#models-memory dd[data-key='rss']", "data-bytes"))
    assert 0.5 < rss / memory["process"]["rss_bytes"] < 2
    first = page.get_attribute("#models-memory", "data-updated")
    wait_until(page, f"document.querySelector('#models-memory').dataset.updated !== '{first}'")  # polled again
    hooks = requests.get(server + "/v1/models/default/hook_points", headers={"Authorization": f"Bearer {KEY}"}, timeout=30).json()
    assert page.eval_on_selector_all("#models-hooks tbody tr", "rows => rows.length") == hooks["num_layers"]
    header = page.eval_on_selector_all("#models-hooks th", "hs => hs.map(h => h.textContent)")
    assert set(hooks["components"]) - {"embedding"} <= set(header)
    page.fill("#models-name", "second-copy")
    page.click("#models-load button[type=submit]")
    page.wait_for_selector("#models-table tr[data-model='second-copy']")
    assert page.eval_on_selector_all("#model-select option", "os => os.map(o => o.value)") == ["default", "second-copy"]
    page.screenshot(path=str(shots / "models.png"), full_page=True)
    page.click("#models-table tr[data-model='second-copy'] button")
    page.wait_for_selector("#models-table tr[data-model='second-copy']", state="detached")
    assert [m["id"] for m in requests.get(server + "/v1/models", headers={"Authorization": f"Bearer {KEY}"}, timeout=30).json()["data"]] == ["default"]


def test_tab_reaches_every_control_of_every_panel(page: Any) -> None:
    for name in ("generate", "layers", "attention", "steer", "models"):
        open_panel(page, name)
        controls = page.evaluate(
            """(name) => {
                const visible = (e) => !e.disabled && e.getClientRects().length > 0 && getComputedStyle(e).visibility !== 'hidden';
                const all = [...document.querySelectorAll('header, #request, #tabs, #panel-' + name + ', footer')]
                    .flatMap((root) => [...root.querySelectorAll('input, select, textarea, button, a[href]')]);
                // Tabs use a roving tab stop (one in the tab order, arrow keys move between them).
                const wanted = all.filter((e) => visible(e) && !(e.getAttribute('role') === 'tab' && e.tabIndex < 0));
                wanted.forEach((e, i) => { e.dataset.tabProbe = String(i); });
                return wanted.length;
            }""",
            name,
        )
        page.evaluate("document.activeElement && document.activeElement.blur(); window.scrollTo(0, 0)")
        page.focus("body")
        reached: set[str] = set()
        for _ in range(controls * 2 + 5):
            page.keyboard.press("Tab")
            probe = page.evaluate("document.activeElement && document.activeElement.dataset.tabProbe")
            if probe is not None:
                reached.add(probe)
        missing = page.evaluate(
            "(reached) => [...document.querySelectorAll('[data-tab-probe]')].filter(e => !reached.includes(e.dataset.tabProbe)).map(e => e.outerHTML.slice(0, 80))",
            sorted(reached),
        )
        assert not missing, f"{name}: Tab never reaches {missing}"
        page.evaluate("document.querySelectorAll('[data-tab-probe]').forEach(e => delete e.dataset.tabProbe)")
    page.focus("#tab-models")
    page.keyboard.press("ArrowRight")
    assert page.evaluate("document.activeElement.id") == "tab-generate" and page.is_visible("#panel-generate")
