"""`mlx-engine demo`: one command that shows the whole product working on real data.

It loads a model, serves it on a free loopback port, asks it one question through the
official OpenAI client and the same question again as a stream through the NeuroScope
bridge, and leaves a new folder a newcomer can open: the capture as safetensors and as
NeuroScope JSON, the Smalltalk client for that server, two pictures drawn from the
captured numbers (PNG and SVG), a static page of the run's views (index.html) and a
summary describing every file. Every figure in the folder is
read back from what the server returned; nothing is made up for the occasion.

Both requests use greedy decoding, so they must produce the same tokens and the same
activations; the summary reports whether they did, which makes the demo a small
end-to-end check of the OpenAI path against the streaming path as well.
"""

from __future__ import annotations

import importlib
from typing import Any

# Layout (file names, hooks), pictures, the page, the flow (run) and the summary, each its own module;
# names are imported on first use so `mlx-engine --help` does not load numpy or matplotlib.
_EXPORTS = {
    "ATTENTION_PNG": "layout", "ATTENTION_SVG": "layout", "CAPTURE_FILE": "layout", "INDEX_FILE": "layout",
    "NEUROSCOPE_FILE": "layout", "RESIDUAL_PNG": "layout", "RESIDUAL_SVG": "layout", "SMALLTALK_FILE": "layout",
    "SUMMARY_FILE": "layout", "DemoHooks": "layout", "choose_hooks": "layout", "new_run_folder": "layout",
    "attention_title": "pictures", "residual_title": "pictures", "token_label": "pictures",
    "write_attention_pictures": "pictures", "write_residual_pictures": "pictures", "write_index": "index_page",
    "demo": "run", "DemoRun": "summary",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
