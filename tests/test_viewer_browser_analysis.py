"""The viewer's analysis panels in headless Chromium (Playwright): logit lens, neurons and features
(with a neuron's histogram and the polysemantic ranking), extraction jobs, SAE steering, and a
completion-mode generation, against a real server on the default model.

The server has a --store-root holding a store built here with `mlx_engine.extract` over a few
short texts; every number the page shows is compared with the same request made over HTTP
here (DOM text and data attributes). Every page must run with no console error; screenshots
go to the pytest tmp folder (`viewer-analysis-screenshots`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
import pytest
import requests
from neuroscope_server import running_server
from test_viewer_browser import CHROMIUM, FLAGS, MAX_TOKENS, by_position, check_colours, label, open_panel, run_generation, wait_until

from mlx_engine import ActivationStore
from mlx_engine.analysis.neurons.polysemantic import polysemanticity
from mlx_engine.loading import DEFAULT_MODEL_DIR

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed: pip install playwright (the test extra)")
KEY = "viewer-analysis-key"
PROMPT = "The cat sat on the mat."
TEXTS = ["The cat sat on the mat.", "def add(a, b):\n    return a + b", "The dog sat on the log.", "x = [1, 2, 3]"]
HOOKS = [{"layer_name": 1, "component": "residual"}, {"layer_name": 2, "component": "residual"}]
RTOL = 1e-6  # the page shows the server's JSON numbers; only JSON's float round trip lies between

pytestmark = [
    pytest.mark.skipif(not CHROMIUM.exists(), reason="chromium not installed: .ci/run installs it with apt-get"),
    pytest.mark.skipif(not (DEFAULT_MODEL_DIR / "config.json").exists(), reason="the embedded default model is not in this checkout"),
]


@pytest.fixture(scope="module")
def store_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from mlx_engine import extract

    root = tmp_path_factory.mktemp("store-root")
    extract(DEFAULT_MODEL_DIR, TEXTS, HOOKS, root / "tiny-store", context_size=32, batch_size=2, top_k=8, progress=False)
    return root


@pytest.fixture(scope="module")
def sae_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A standard SAE of random weights on layer 1's residual (64 features), in SAELens's format."""
    from mlx_engine.sae.formats import save_sae
    from mlx_engine.sae.model import SAE, SAEConfig

    rng = np.random.default_rng(0)
    decoder = rng.standard_normal((64, 256)).astype(np.float32)
    decoder /= np.linalg.norm(decoder, axis=1, keepdims=True)
    arrays = {"W_enc": decoder.T.copy(), "W_dec": decoder, "b_enc": np.zeros(64, np.float32), "b_dec": np.zeros(256, np.float32)}
    root = tmp_path_factory.mktemp("sae-root")
    save_sae(SAE(SAEConfig("standard", 256, 64, hook_name="blocks.1.hook_resid_post"), {k: mx.array(v) for k, v in arrays.items()}), root / "resid1")
    return root


@pytest.fixture(scope="module")
def server(store_root: Path, sae_root: Path) -> Iterator[str]:
    with running_server("default", api_key=KEY, store_root=store_root, sae_roots=(sae_root,)) as url:
        yield url


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=FLAGS)
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("viewer-analysis-screenshots")


@pytest.fixture
def page(browser: Any, server: str) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    tab = context.new_page()
    errors: list[str] = []
    tab.on("console", lambda m: errors.append(f"console.{m.type}: {m.text}") if m.type == "error" else None)
    tab.on("pageerror", lambda e: errors.append(f"page error: {e}"))
    tab.goto(server + "/ui/")
    tab.wait_for_selector("body[data-ready=true]")
    tab.fill("#api-key", KEY)
    tab.press("#api-key", "Enter")
    wait_until(tab, "document.querySelector('#model-select').value === 'default'")
    tab.fill("#req-prompt", PROMPT)
    yield tab
    context.close()
    assert not errors, errors


def get(server: str, path: str, **params: Any) -> dict[str, Any]:
    response = requests.get(server + path, params=params, headers={"Authorization": f"Bearer {KEY}"}, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()


def post(server: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
    response = requests.post(server + path, json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()


def chart_option(page: Any, selector: str) -> dict[str, Any]:
    """What ECharts draws in a chart: its title, axis names and the bars' values, from the chart itself."""
    return page.evaluate(
        """async (selector) => {
            const echarts = await import("/ui/vendor/echarts/echarts.esm.min.mjs");
            const o = echarts.getInstanceByDom(document.querySelector(selector)).getOption();
            return { title: o.title[0].text, x: o.xAxis[0].name, y: o.yAxis[0].name, values: o.series[0].data };
        }""",
        selector,
    )


def close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=RTOL, abs_tol=1e-12)


# ----------------------------------------------------------------------------- logit lens


def test_lens_grid_shows_the_servers_top_tokens_and_ranks(page: Any, server: str, shots: Path) -> None:
    open_panel(page, "lens")
    page.fill("#lens-top-k", "3")
    page.click("#lens-run")
    page.wait_for_selector("#lens-details table[data-position]")
    body = page.eval_on_selector("#lens-grid", "e => JSON.parse(e.dataset.request)")
    assert body == {"model": "default", "prompt": PROMPT, "top_k": 3}
    response = requests.post(server + "/v1/analysis/logit_lens", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=120)
    assert response.status_code == 200, response.text
    lens = response.json().get("lens", response.json())
    cells = page.eval_on_selector_all("#lens-grid td", "tds => tds.map(t => [t.dataset.layer, Number(t.dataset.position), t.dataset.token, Number(t.dataset.prob), Number(t.dataset.rank), t.querySelector('.lens-token').textContent])")
    assert len(cells) == len(lens["layers"]) * len(lens["tokens"])
    for layer, position, token, prob, rank, shown in cells:
        r = lens["layers"].index(layer)
        assert token == lens["top_strings"][r][position][0] and shown == label(token)
        assert close(prob, lens["top_probs"][r][position][0]) and rank == lens["next_rank"][r][position]
    ranks = page.eval_on_selector_all("#lens-grid tbody tr[data-layer='0'] .lens-rank", "ss => ss.map(s => s.textContent)")
    assert ranks == [f"next #{r}" for r in lens["next_rank"][lens["layers"].index("0")]]
    headers = page.eval_on_selector_all("#lens-grid thead th[data-position]", "ths => ths.map(t => t.textContent)")
    assert headers == [f"{p} {label(t)}" for p, t in enumerate(lens["token_strings"])]
    # A click on a cell opens its position's details.
    page.click("#lens-grid td[data-position='2'][data-layer='0']")
    page.wait_for_selector("#lens-details table[data-position='2']")
    rows = page.eval_on_selector_all("#lens-details tbody tr", "rs => rs.map(r => [r.dataset.layer, Number(r.dataset.rank), Number(r.dataset.prob)])")
    assert [(layer, rank) for layer, rank, _ in rows] == [(layer, lens["next_rank"][r][2]) for r, layer in enumerate(lens["layers"])]
    assert all(close(prob, lens["next_prob"][r][2]) for r, (_, _, prob) in enumerate(rows))
    assert label(lens["next_strings"][2]) in page.text_content("#lens-details h3")
    page.screenshot(path=str(shots / "lens.png"), full_page=True)


# ----------------------------------------------------------------------------- stores


def show_neuron(page: Any, hook: str, neuron: int) -> None:
    page.select_option("#neu-hook", hook)
    page.fill("#neu-index", str(neuron))
    page.click("#neu-show")
    wait_until(page, f"document.querySelector('#neu-stats').dataset.neuron === '{neuron}' && document.querySelectorAll('#neu-ngrams table').length > 0 && document.querySelector('#neu-examples li[data-max-value]') !== null")


def test_neurons_panel_shows_the_stores_numbers(page: Any, server: str, store_root: Path, shots: Path) -> None:
    open_panel(page, "neurons")
    wait_until(page, "document.querySelector('#neu-store').options.length > 0")
    assert page.eval_on_selector_all("#neu-store option", "os => os.map(o => o.value)") == [s["id"] for s in get(server, "/v1/stores")["data"]] == ["tiny-store"]
    hook = "layers.2.residual"
    stats = get(server, "/v1/stores/tiny-store/stats", hook=hook)
    neuron = max(range(len(stats["neurons"])), key=lambda i: stats["neurons"][i]["max"])
    show_neuron(page, hook, neuron)
    shown = page.eval_on_selector_all("#neu-stats td[data-key]", "tds => tds.map(t => [t.dataset.key, t.dataset.value])")
    row = stats["neurons"][neuron]
    for key, value in shown:
        assert (value == "true") == row[key] if key == "dead" else close(float(value), row[key]), (key, value, row[key])
    dead = page.eval_on_selector("#neu-dead", "e => JSON.parse(e.dataset.dead)")
    assert dead == [r["neuron"] for r in stats["neurons"] if r["dead"]]
    # The histogram counts the server's per-neuron means into 20 equal bins.
    means = [r["mean"] for r in stats["neurons"]]
    lo, hi = min(means), max(means)
    counts = [0] * 20
    for m in means:
        counts[min(19, math.floor((m - lo) / ((hi - lo) / 20)))] += 1
    assert page.eval_on_selector("#neu-hist", "e => JSON.parse(e.dataset.counts)") == counts
    examples = get(server, "/v1/stores/tiny-store/top_examples", hook=hook, neuron=neuron, k=8)["examples"]
    items = page.eval_on_selector_all("#neu-examples li", "ls => ls.map(l => [Number(l.dataset.maxValue), Number(l.dataset.doc), Number(l.dataset.pos), [...l.querySelectorAll('.tok')].map(t => [t.dataset.token, Number(t.dataset.value)]), [...l.querySelectorAll('.tok.peak')].map(t => t.dataset.token)])")
    assert len(items) == len(examples) >= 1
    for (value, doc, pos, tokens, peak), e in zip(items, examples):
        assert close(value, e["maxValue"]) and (doc, pos) == (e["doc"], e["pos"])
        assert [t for t, _ in tokens] == e["tokens"] and all(close(v, w) for (_, v), w in zip(tokens, e["values"]))
        assert peak == [e["tokens"][e["maxValueTokenIndex"]]]
    # The token-entropy measure of polysemanticity, against the Python API's (same k: the store keeps 8).
    want = polysemanticity(ActivationStore.open(store_root / "tiny-store"), hook, [neuron], k=8)[0]["token_entropy"]
    assert math.isclose(float(page.get_attribute("#neu-poly", "data-token-entropy")), want, rel_tol=1e-9, abs_tol=1e-12)
    reverse = get(server, "/v1/stores/tiny-store/reverse", hook=hook, neuron=neuron, n=3, k=5)["ngrams"]
    tables = page.eval_on_selector_all("#neu-ngrams table", "ts => ts.map(t => [t.dataset.n, [...t.querySelectorAll('tbody tr')].map(r => [Number(r.dataset.mean), Number(r.dataset.count)])])")
    assert [n for n, _ in tables] == list(reverse)
    for n, rows in tables:
        assert [(round(m, 9), c) for m, c in rows] == [(round(r["mean"], 9), r["count"]) for r in reverse[n]]
    # The reverse query the other way: the neurons " the" fires, and a click that opens one.
    page.fill("#neu-ngram", " sat")
    page.click("#neu-reverse button[type=submit]")
    page.wait_for_selector("#neu-token-neurons tr[data-neuron]")
    fired = get(server, "/v1/stores/tiny-store/reverse", hook=hook, ngram=" sat", k=10)
    listed = page.eval_on_selector_all("#neu-token-neurons tr[data-neuron]", "rs => rs.map(r => [Number(r.dataset.neuron), Number(r.dataset.mean)])")
    assert [(n, round(m, 9)) for n, m in listed] == [(r["neuron"], round(r["mean"], 9)) for r in fired["hooks"][hook]["neurons"]]
    assert f"occurs {fired['count']} times" in page.text_content("#neu-token-neurons")
    # The neuron's own histogram: the route's bins and counts, drawn with labelled axes; numpy agrees on the rows.
    wait_until(page, f"document.querySelector('#neu-dist').dataset.neuron === '{neuron}'")
    dist = get(server, "/v1/stores/tiny-store/distribution", hook=hook, neuron=neuron, bins=32)
    assert page.eval_on_selector("#neu-dist", "e => [JSON.parse(e.dataset.counts), JSON.parse(e.dataset.edges)]") == [dist["counts"], dist["edges"]]
    drawn = chart_option(page, "#neu-dist")
    assert drawn["values"] == dist["counts"] and drawn["title"] == f"Activations of neuron {neuron} ({hook})"
    assert drawn["x"].startswith("activation value") and drawn["y"] == "count"
    assert drawn["title"] in page.eval_on_selector_all("#neu-dist svg text", "ts => ts.map(t => t.textContent)")
    column = np.asarray(ActivationStore.open(store_root / "tiny-store").rows(hook), np.float64)[:, neuron]
    assert dist["exact"] and dist["counts"] == np.histogram(column, bins=np.asarray(dist["edges"]))[0].tolist()
    page.screenshot(path=str(shots / "neurons.png"), full_page=True)
    first = listed[0][0]
    page.click(f"#neu-token-neurons tr[data-neuron='{first}'] button")
    wait_until(page, f"document.querySelector('#neu-stats').dataset.neuron === '{first}'")
    # The polysemantic ranking: the route's rows in its order, which is the Python function's; a click opens one.
    page.click("#neu-poly-form button[type=submit]")
    page.wait_for_selector("#neu-poly-list tr[data-neuron]")
    ranked = get(server, "/v1/stores/tiny-store/polysemantic", hook=hook, top=20)["neurons"]
    rows = page.eval_on_selector_all("#neu-poly-list tr[data-neuron]", "rs => rs.map(r => [Number(r.dataset.neuron), Number(r.dataset.rank), Number(r.dataset.clusters), Number(r.dataset.tokenEntropy)])")
    assert [(n, k, c) for n, k, c, _ in rows] == [(r["neuron"], r["rank"], r["clusters"]) for r in ranked]
    assert all(close(e, r["token_entropy"]) for (_, _, _, e), r in zip(rows, ranked))
    want = polysemanticity(ActivationStore.open(store_root / "tiny-store"), hook)[:20]
    assert [r["neuron"] for r in want] == [n for n, *_ in rows]
    other = next(n for n, *_ in rows if n != first)
    page.click(f"#neu-poly-list tr[data-neuron='{other}'] button")
    wait_until(page, f"document.querySelector('#neu-stats').dataset.neuron === '{other}' && document.querySelector('#neu-dist').dataset.neuron === '{other}'")


def test_neurons_panel_says_how_to_get_stores(browser: Any, tmp_path: Path) -> None:
    with running_server("default") as url:
        context = browser.new_context()
        tab = context.new_page()
        tab.goto(url + "/ui/#neurons")
        tab.wait_for_selector("body[data-ready=true]")
        wait_until(tab, "document.querySelector('#neu-note').textContent.length > 0")
        assert "--store-root DIR" in tab.text_content("#neu-note")
        context.close()


# ----------------------------------------------------------------------------- completion mode


def test_generate_in_completion_mode_streams_the_raw_prompts_captures(page: Any, server: str, shots: Path) -> None:
    sent: list[Any] = []
    page.on("request", lambda r: sent.append(r.post_data) if r.url.endswith("/v1/completions/with_activations") else None)
    page.select_option("#req-mode", "completion")
    open_panel(page, "generate")
    wait_until(page, "document.querySelector('#gen-layer').options.length > 0")
    page.select_option("#gen-scalar", "norm")
    page.select_option("#gen-layer", "2")
    spans = run_generation(page)
    counts = page.evaluate("window.__counts")
    assert len({c for c in counts if c > 0}) >= 3, f"the tokens did not arrive one by one: {counts}"
    (body,) = [json.loads(d) for d in sent]
    assert body["stream"] is True and body["prompt"] == PROMPT and "messages" not in body
    assert page.get_attribute("#gen-tokens", "data-path") == "/v1/completions/with_activations"
    reference = post(server, "/v1/completions/with_activations", {
        "model": "default", "prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0,
        "activation_hooks": [{"layer_name": 2, "component": "residual"}], "activation_format": "base64"})
    assert [s["token"] for s in spans] == reference["prompt_tokens_text"] + reference["generated_tokens_text"]
    n_prompt = len(reference["prompt_tokens_text"])
    assert [s["source"] for s in spans] == ["prompt"] * n_prompt + ["generated"] * MAX_TOKENS
    check_colours(page, spans, by_position(reference["activations"]["layers.2.residual"], lambda a, c: np.linalg.norm(a, axis=-1)))
    assert page.text_content("#gen-content") == reference["choices"][0]["text"]
    page.screenshot(path=str(shots / "generate-completion.png"), full_page=True)


# ----------------------------------------------------------------------------- extraction jobs


def test_models_panel_starts_and_follows_an_extraction_job(page: Any, server: str, shots: Path) -> None:
    open_panel(page, "models")
    wait_until(page, "document.querySelector('#jobs-layers').options.length > 0")
    page.fill("#jobs-documents", "one two three\nfour five six")
    page.select_option("#jobs-component", "residual")
    page.select_option("#jobs-layers", ["0", "3"])
    page.click("#jobs-start button[type=submit]")
    page.wait_for_selector("#jobs-table tr[data-state=completed]", timeout=60_000)
    job_id = page.get_attribute("#jobs-table tr[data-state=completed]", "data-job")
    job = get(server, f"/v1/extract/{job_id}")
    assert job["state"] == "completed" and job["documents_total"] == 2
    row = page.eval_on_selector(f"#jobs-table tr[data-job='{job_id}']", "r => [Number(r.dataset.documentsDone), Number(r.dataset.tokensDone), r.querySelector('progress').value, r.querySelector('progress').max]")
    assert row == [job["documents_done"], job["tokens_done"], 2, 2]
    stores = {s["id"]: s for s in get(server, "/v1/stores")["data"]}
    assert [h["hook"] for h in stores[job["store"]]["hooks"]] == ["layers.0.residual", "layers.3.residual"]
    page.screenshot(path=str(shots / "models-jobs.png"), full_page=True)
    # A long job, cancelled from the page: the server reports it cancelled, and the page shows it.
    long = requests.post(server + "/v1/extract", json={"documents": [f"document number {i} of many" for i in range(3000)], "hooks": HOOKS,
                                                       "batch_size": 1, "context_size": 16}, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    assert long.status_code == 200, long.text
    long_id = long.json()["id"]
    page.click(f"#jobs-table tr[data-job='{long_id}'] button", timeout=10_000)
    page.wait_for_selector(f"#jobs-table tr[data-job='{long_id}'][data-state=cancelled]", timeout=60_000)
    cancelled = get(server, f"/v1/extract/{long_id}")
    assert cancelled["state"] == "cancelled" and cancelled["documents_done"] < 3000


# ----------------------------------------------------------------------------- SAE steering


def test_steer_with_an_sae_feature_equals_the_same_requests_over_http(page: Any, server: str, shots: Path) -> None:
    open_panel(page, "steer")
    page.fill("#req-max-tokens", "10")
    page.select_option("#steer-kind", "sae")
    wait_until(page, "document.querySelector('#steer-sae-note').textContent.includes('No SAE is attached')")
    page.fill("#steer-sae-source", "resid1")  # attached from the page, a folder under the server's --sae-root
    page.click("#steer-sae-attach button[type=submit]")
    wait_until(page, "document.querySelector('#steer-sae').options.length > 0")
    listed = get(server, "/v1/models/default/saes")["data"]
    sae_id = listed[0]["hook_id"]
    assert page.eval_on_selector_all("#steer-sae option", "os => os.map(o => o.value)") == [s["hook_id"] for s in listed] == ["layers.1.residual.sae_features"]
    page.fill("#steer-feature", "5")
    page.fill("#steer-sae-amount", "60")
    page.click("#steer-run")
    wait_until(page, "document.querySelector('#steer-steered').dataset.tokens !== undefined && document.querySelector('#status').textContent === 'Both runs done.'")
    shown = {name: page.eval_on_selector(f"#steer-{name}", "e => JSON.parse(e.dataset.tokens)") for name in ("unsteered", "steered")}
    sent = page.eval_on_selector("#steer-steered", "e => JSON.parse(e.dataset.request)")
    vector = [0.0] * 64
    vector[5] = 1.0
    assert sent["interventions"] == [{"sae": sae_id, "op": "add", "vector": vector, "scale": 60, "positions": "all"}]

    def chat(**extra: Any) -> list[str]:
        body = {"model": "default", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 10, "temperature": 0,
                "activation_hooks": [{"layer_name": 3, "component": "residual"}], "activation_format": "none", **extra}
        response = requests.post(server + "/v1/chat/completions/with_activations", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=120)
        assert response.status_code == 200, response.text
        return response.json()["generated_tokens_text"]

    steered = chat(interventions=[{"sae": sae_id, "op": "add", "vector": vector, "scale": 60, "positions": "all"}])
    assert shown == {"unsteered": chat(), "steered": steered}
    assert shown["steered"] != shown["unsteered"]
    page.screenshot(path=str(shots / "steer-sae.png"), full_page=True)
    requests.delete(server + f"/v1/models/default/saes/{sae_id}", headers={"Authorization": f"Bearer {KEY}"}, timeout=60)


# ----------------------------------------------------------------------------- keyboard


def test_tab_reaches_every_control_of_the_analysis_panels(page: Any) -> None:
    for name in ("lens", "neurons"):
        open_panel(page, name)
        wanted = page.evaluate(
            """(name) => {
                const visible = (e) => !e.disabled && e.getClientRects().length > 0;
                const all = [...document.querySelectorAll('#panel-' + name + ' input, #panel-' + name + ' select, #panel-' + name + ' button')];
                const wanted = all.filter(visible);
                wanted.forEach((e, i) => { e.dataset.tabProbe = String(i); });
                return wanted.length;
            }""",
            name,
        )
        page.focus(f"#tab-{name}")
        reached = set()
        for _ in range(wanted * 2 + 40):
            page.keyboard.press("Tab")
            probe = page.evaluate("document.activeElement && document.activeElement.dataset.tabProbe")
            if probe is not None:
                reached.add(probe)
        assert len(reached) == wanted, f"{name}: Tab reached {len(reached)} of {wanted} controls"
        page.evaluate("document.querySelectorAll('[data-tab-probe]').forEach(e => delete e.dataset.tabProbe)")
