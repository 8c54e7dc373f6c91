"""The viewer's routes without a browser: /ui/ and its files, public and offline; /v1/memory.

What is checked: the page and every file it loads are served by the package under /ui/ with
their media types and a same-origin Content Security Policy, without the API key (a browser
cannot send one to load a page) while the API itself still wants it; every script, style
sheet and link in the viewer's own files is relative (nothing from a CDN), and every module
it imports exists; paths outside the folder are 404s; the vendored ECharts is the file its
README names; the page's colours are matplotlib's viridis; and GET /v1/memory reports the
process's real memory, documented in the OpenAPI document.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import re
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import jsonschema
import matplotlib
import numpy as np
import pytest
import requests
from mlx.utils import tree_flatten
from neuroscope_server import running_server

import mlx_engine
from mlx_engine.loading import DEFAULT_MODEL_DIR
from mlx_engine.server.routes.ui import SHARED_MODULES, UI_DIR

KEY = "viewer-routes-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
OWN_FILES = sorted(p for p in UI_DIR.rglob("*") if p.suffix in {".html", ".mjs", ".css"} and "vendor" not in p.parts)
TYPES = {".html": "text/html", ".mjs": "text/javascript", ".css": "text/css", ".md": "text/markdown", "": "text/plain"}
# import ... from "x"; import("x"); import "x"; export ... from "x"; src="x"; href="x"; url(x)
REFERENCE = re.compile(r"""(?:(?:\bfrom|\bimport\s*\(|\bimport|\bsrc=|\bhref=)\s*["'`]([^"'`]+)["'`]|url\(\s*["']?([^"')]+))""")

pytestmark = pytest.mark.skipif(not (DEFAULT_MODEL_DIR / "config.json").exists(), reason="the embedded default model is not in this checkout")


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    with running_server("default", api_key=KEY) as base:
        yield base


def test_page_and_files_are_served_without_the_key(url: str) -> None:
    moved = requests.get(url + "/ui", allow_redirects=False, timeout=30)
    assert moved.status_code == 308 and moved.headers["Location"].endswith("/ui/")
    page = requests.get(url + "/ui/", timeout=30)
    assert page.status_code == 200 and page.headers["Content-Type"].startswith("text/html")
    assert "default-src 'self'" in page.headers["Content-Security-Policy"] and page.headers["X-Content-Type-Options"] == "nosniff"
    assert '<script type="module" src="app.mjs">' in page.text
    served = 0
    for path in sorted(p for p in UI_DIR.rglob("*") if p.is_file()):
        name = path.relative_to(UI_DIR).as_posix()
        got = requests.get(f"{url}/ui/{name}", timeout=30)
        assert got.status_code == 200, name
        assert got.headers["Content-Type"].split(";")[0] == TYPES.get(path.suffix, "text/plain"), name
        assert got.content == path.read_bytes(), name
        served += 1
    for name, path in SHARED_MODULES.items():
        assert requests.get(f"{url}/ui/{name}", timeout=30).content == path.read_bytes()
    assert served >= 15


def test_the_api_still_wants_the_key(url: str) -> None:
    for path in ("/v1/memory", "/v1/models"):
        assert requests.get(url + path, timeout=30).status_code == 401
        assert requests.get(url + path, headers=AUTH, timeout=30).status_code == 200
    # The page learns from the public OpenAPI document that it must ask for a key.
    doc = requests.get(url + "/openapi.json", timeout=30).json()
    assert doc["security"] == [{"bearerAuth": []}]


def test_paths_outside_the_viewer_are_not_found(url: str) -> None:
    host = urlsplit(url)
    for raw in ("/ui/no-such-file.mjs", "/ui/../routes/ui.py", "/ui/%2e%2e/routes/ui.py", "/ui/..%2f..%2fapp.py", "/ui/panels/../../routes/ui.py"):
        conn = http.client.HTTPConnection(host.hostname, host.port, timeout=30)
        conn.request("GET", raw)  # sent as written: no client-side normalisation of '..'
        response = conn.getresponse()
        body = response.read()
        conn.close()
        assert response.status == 404, (raw, response.status)
        assert b"import" not in body and b"def " not in body, raw


def test_the_viewer_loads_nothing_from_elsewhere_and_every_import_exists() -> None:
    seen = 0
    for path in OWN_FILES:
        text = path.read_text(encoding="utf-8")
        for quoted, in_css in REFERENCE.findall(text):
            ref = quoted or in_css
            if ref.startswith(("data:", "#")) or "${" in ref:
                continue
            seen += 1
            assert not re.match(r"^(?:[a-z]+:)?//", ref), f"{path.name} loads {ref} from elsewhere"
            target = (path.parent / ref).resolve()
            shared = target.relative_to(UI_DIR).as_posix() if target.is_relative_to(UI_DIR) else None
            assert target.exists() or shared in SHARED_MODULES or ref == "../openapi.json", f"{path.name}: {ref} does not exist"
    assert seen >= 30
    panels = re.search(r"const PANELS = \[([^\]]+)\]", (UI_DIR / "app.mjs").read_text()).group(1)
    for name in re.findall(r'"(\w+)"', panels):
        assert (UI_DIR / "panels" / f"{name}.mjs").is_file(), name
    vendored = (UI_DIR / "vendor" / "echarts" / "echarts.esm.min.mjs").read_text(encoding="utf-8")
    assert not re.search(r"""\bimport\s*\(?\s*["'](?:https?:)?//""", vendored), "the vendored ECharts imports from the network"
    for path in OWN_FILES:  # not even in a comment: the viewer's own files name no remote address
        assert not re.search(r"https?://", path.read_text(encoding="utf-8")), path.name


def test_vendored_echarts_is_the_file_its_readme_names() -> None:
    readme = (UI_DIR / "vendor" / "README.md").read_text(encoding="utf-8")
    row = re.search(r"\| \[echarts\][^|]*\| ([\d.]+) \| `([^`]+)` \| `([^`]+)` \| `([0-9a-f]{64})` \|", readme)
    assert row, "vendor/README.md lacks the echarts row"
    version, file, source, digest = row.groups()
    data = (UI_DIR / "vendor" / file).read_bytes()
    assert hashlib.sha256(data).hexdigest() == digest
    assert source == "dist/echarts.esm.min.mjs" and f'"{version}"'.encode() in data
    assert "Apache License" in (UI_DIR / "vendor" / "echarts" / "LICENSE").read_text()
    assert "Apache ECharts" in (UI_DIR / "vendor" / "echarts" / "NOTICE").read_text()
    assert (UI_DIR / "vendor" / "echarts" / "LICENSE-d3").is_file()
    refresh = (UI_DIR / "vendor" / "refresh.sh").read_text()
    assert f'VERSION="${{1:-{version}}}"' in refresh and "dist/echarts.esm.min.mjs" in refresh


def test_page_colours_are_matplotlibs_viridis() -> None:
    source = (UI_DIR / "colors.mjs").read_text(encoding="utf-8")
    hexes = "".join(re.findall(r'"([0-9a-f]{96})"', source))
    assert len(hexes) == 256 * 6
    page = np.array([[int(hexes[i + j : i + j + 2], 16) for j in (0, 2, 4)] for i in range(0, len(hexes), 6)])
    cmap = matplotlib.colormaps["viridis"]
    want = np.round(np.asarray(cmap(np.arange(cmap.N)))[:, :3] * 255).astype(int)
    np.testing.assert_array_equal(page, want)


def test_memory_is_the_process_s_and_is_documented(url: str) -> None:
    body = requests.get(url + "/v1/memory", headers=AUTH, timeout=30).json()
    doc = requests.get(url + "/openapi.json", timeout=30).json()
    operation = doc["paths"]["/v1/memory"]["get"]
    assert "Service" in operation["tags"]
    schema = {"$ref": operation["responses"]["200"]["content"]["application/json"]["schema"]["$ref"], "components": doc["components"]}
    jsonschema.validate(body, schema, cls=jsonschema.Draft202012Validator)
    # The server runs in this process: its weights are the default model's, byte for byte.
    kit = mlx_engine.load_model("default")
    weights = sum(v.nbytes for _, v in tree_flatten(kit.model.parameters()))
    assert body["models"] == [{"id": "default", "parameter_bytes": weights}]
    mlx = body["mlx"]
    assert mlx["active_bytes"] >= weights and mlx["peak_bytes"] >= mlx["active_bytes"] > 0 and mlx["limit_bytes"] > 0
    if Path("/proc/self/statm").exists():
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        import os

        ours = pages * os.sysconf("SC_PAGE_SIZE")
        assert 0.5 * ours < body["process"]["rss_bytes"] < 2 * ours
        assert body["process"]["peak_rss_bytes"] > 0
    assert json.dumps(body)  # plain JSON, nothing else
