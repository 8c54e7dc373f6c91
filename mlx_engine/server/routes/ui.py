"""The viewer: a page at /ui/ on the API's own server, and the memory reading it shows live.

The page is static files shipped in the package (`server/ui/`: HTML, ES modules, CSS and
the vendored Apache ECharts), so it works offline, loads nothing from elsewhere, and calls
the API from the server's own origin (no CORS). It holds no data: every number it shows is
fetched from the API with the key the page asks for. A browser cannot attach a key to a page
load, so these files are public (`openapi.is_public`); they are the same for everyone.

`GET /v1/memory` is the process's memory as the Models panel polls it: /health says what
the engine is doing, not how much memory it holds.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

import mlx.core as mx
from flask import Blueprint, Response, jsonify, send_from_directory
from mlx.utils import tree_flatten

from ..errors import APIError
from ..openapi import operation
from ..schemas.responses import MemoryResponse
from ..state import state

bp = Blueprint("ui", __name__)
UI_DIR = Path(__file__).resolve().parent.parent / "ui"
# Modules of the package the page imports from elsewhere in the tree: one client, not two.
SHARED_MODULES = {
    "lib/neuroscope-client.mjs": Path(__file__).resolve().parents[2] / "integrations" / "neuroscope" / "js" / "neuroscope-client.mjs",
}
MEDIA_TYPES = {
    ".html": "text/html",
    ".mjs": "text/javascript",
    ".js": "text/javascript",
    ".css": "text/css",
    ".svg": "image/svg+xml",
    ".md": "text/markdown",
}
# The page runs only its own files; ECharts sets inline styles on the elements it draws.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data: blob:; "
    "connect-src 'self'; font-src 'self'; object-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


def _static(folder: Path, name: str) -> Response:
    """One file of the viewer, with headers that keep it to its own origin (a 404 for anything else)."""
    response = send_from_directory(folder, name, mimetype=MEDIA_TYPES.get(Path(name).suffix, "text/plain"), max_age=0)
    response.headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "no-referrer"
    return response


@bp.get("/ui/")
def page() -> Response:
    """The viewer's page (GET /ui redirects here, so the page's relative imports resolve under /ui/)."""
    return _static(UI_DIR, "index.html")


@bp.get("/ui/<path:filename>")
def asset(filename: str) -> Response:
    """A script, style sheet or licence file of the viewer."""
    shared = SHARED_MODULES.get(filename)
    if shared is not None:
        return _static(shared.parent, shared.name)
    if not (UI_DIR / filename).is_file():
        raise APIError(f"The viewer has no file {filename!r}.", status=404, type="not_found_error", code="not_found")
    return _static(UI_DIR, filename)


# ----------------------------------------------------------------------------- memory


def _resident_bytes() -> Optional[int]:
    """The resident set size now, where the system says (Linux /proc); None elsewhere."""
    try:
        with open("/proc/self/statm", encoding="ascii") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _peak_resident_bytes() -> Optional[int]:
    try:
        import resource
    except ImportError:  # not on this platform
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024  # macOS counts bytes, Linux KiB


def _parameter_bytes(model: object) -> int:
    """Bytes of a model's weights as stored (packed, for quantized layers): array sizes, no evaluation."""
    return sum(int(v.nbytes) for _, v in tree_flatten(model.parameters()))  # type: ignore[attr-defined]


@bp.get("/v1/memory")
@operation(
    summary="The process's memory: resident set, MLX's allocator, each loaded model's weights",
    tags=("Service",),
    response=MemoryResponse,
    description="Read on the request thread, without waiting for a running generation: MLX's counters "
    "(active, cache, peak, limit) are the allocator's own, and the resident set is the system's (null "
    "where it offers no reading: the current resident set comes from /proc).",
)
def memory() -> Response:
    return jsonify(
        {
            "object": "memory",
            "process": {"rss_bytes": _resident_bytes(), "peak_rss_bytes": _peak_resident_bytes()},
            "mlx": {
                "active_bytes": int(mx.get_active_memory()),
                "cache_bytes": int(mx.get_cache_memory()),
                "peak_bytes": int(mx.get_peak_memory()),
                "limit_bytes": int(mx.get_memory_limit()),
            },
            "models": [{"id": m.model_id, "parameter_bytes": _parameter_bytes(m.kit.model)} for m in state().registry.all()],
        }
    )
