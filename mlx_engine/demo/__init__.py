"""`mlx-engine demo`: one command that shows the whole product working on real data.

It loads a model, serves it on a free loopback port, asks it one question through the
official OpenAI client and the same question again as a stream through the NeuroScope
bridge, and leaves a new folder a newcomer can open: the capture as safetensors and as
NeuroScope JSON, the Smalltalk client for that server, two pictures drawn from the
captured numbers, and a summary describing every file. Every figure in the folder is
read back from what the server returned; nothing is made up for the occasion.

Both requests use greedy decoding, so they must produce the same tokens and the same
activations; the summary reports whether they did, which makes the demo a small
end-to-end check of the OpenAI path against the streaming path as well.
"""

from .layout import (
    ATTENTION_PNG,
    CAPTURE_FILE,
    NEUROSCOPE_FILE,
    RESIDUAL_PNG,
    SMALLTALK_FILE,
    SUMMARY_FILE,
    DemoHooks,
    choose_hooks,
    new_run_folder,
)
from .pictures import (
    ATTENTION_CELL,
    CELL,
    HEAD_GAP,
    HEADS_PER_ROW,
    attention_png_size,
    write_attention_png,
    write_residual_png,
)
from .run import add_demo_command, demo, run_demo
from .summary import DemoRun

__all__ = [
    "ATTENTION_CELL",
    "ATTENTION_PNG",
    "CAPTURE_FILE",
    "CELL",
    "DemoHooks",
    "DemoRun",
    "HEADS_PER_ROW",
    "HEAD_GAP",
    "NEUROSCOPE_FILE",
    "RESIDUAL_PNG",
    "SMALLTALK_FILE",
    "SUMMARY_FILE",
    "add_demo_command",
    "attention_png_size",
    "choose_hooks",
    "demo",
    "new_run_folder",
    "run_demo",
    "write_attention_png",
    "write_residual_png",
]
