"""A training run's full state in one file, written atomically, so a killed run resumes to the same result.

checkpoint.safetensors holds the parameters (`param/...`), Adam's moments and step
(`opt/...`), the steps since each latent last fired (`since_fired`), and in its metadata (one
JSON string) the step, the numpy generator's state, the BatchTopK threshold, the
normalisation constants, the logged history and the settings' fingerprint. It is written to a
temporary name and renamed over the old one (os.replace is atomic), so a kill at any moment
leaves either the previous checkpoint or the new one, never half of one. Python floats go
through JSON as repr, which is exact, so the resumed run continues bit for bit.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from .model import SAEError

CHECKPOINT = "checkpoint.safetensors"
PARAM_ORDER = ("W_enc", "W_dec", "b_enc", "b_dec", "threshold")  # as initial_params builds them


@dataclass
class TrainState:
    """Everything a step reads besides the batch."""

    params: dict[str, mx.array]
    opt_state: dict[str, Any]
    since_fired: np.ndarray  # int64 [d_sae]
    step: int
    rng: np.random.Generator
    scales: list[float]  # normalisation constants: input (and target)
    threshold: float = 0.0  # BatchTopK's running inference threshold
    history: list[dict[str, Any]] = field(default_factory=list)


def save_checkpoint(folder: Path, state: TrainState, fingerprint: str) -> None:
    arrays = {f"param/{k}": v for k, v in state.params.items()}
    arrays.update({f"opt/{k}": v for k, v in tree_flatten(state.opt_state)})
    arrays["since_fired"] = mx.array(state.since_fired.astype(np.int64))
    meta = {
        "step": state.step, "rng": state.rng.bit_generator.state, "scales": state.scales, "threshold": state.threshold,
        "history": state.history, "fingerprint": fingerprint,
    }
    tmp = folder / f".{CHECKPOINT}.tmp.safetensors"
    mx.save_safetensors(str(tmp), arrays, metadata={"state": json.dumps(meta)})
    os.replace(tmp, folder / CHECKPOINT)


def load_checkpoint(folder: Path, fingerprint: str) -> Optional[TrainState]:
    """The saved state of this run, or None; a checkpoint of other settings is refused."""
    path = folder / CHECKPOINT
    if not path.exists():
        return None
    try:
        arrays, header = mx.load(str(path), return_metadata=True)
        meta = json.loads(header["state"])
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise SAEError(f"{path} cannot be read ({exc}); remove it to start the run again.") from None
    if meta.get("fingerprint") != fingerprint:
        raise SAEError(
            f"{folder} holds a checkpoint of a run with other settings or data; give a new --out folder, "
            "or re-run with the settings it was started with (training.json)."
        )
    # The trees in the order the run built them (safetensors sorts its keys): gradient clipping sums the
    # leaves' squared norms in tree order, and float addition is order-dependent.
    params = {k: arrays[f"param/{k}"] for k in PARAM_ORDER if f"param/{k}" in arrays}
    loaded = tree_unflatten([(k.removeprefix("opt/"), v) for k, v in arrays.items() if k.startswith("opt/")])
    opt = {k: loaded[k] for k in ("step", "learning_rate", *params) if k in loaded}
    rng = np.random.default_rng()
    rng.bit_generator.state = meta["rng"]
    return TrainState(params, opt, np.array(arrays["since_fired"]).astype(np.int64), int(meta["step"]), rng,
                      [float(s) for s in meta["scales"]], float(meta["threshold"]), list(meta["history"]))


def remove_checkpoint(folder: Path) -> None:
    (folder / CHECKPOINT).unlink(missing_ok=True)
