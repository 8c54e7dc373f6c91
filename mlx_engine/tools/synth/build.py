"""`synthesize`: one call from an architecture name to a loadable checkpoint folder.

It validates the request before anything is written, then runs the steps the other
modules provide: config (presets), tensor list (plan), shards (writer), tokenizer.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

from .plan import logical_parameters, plan_tensors, tensor_chunks
from .presets import architecture_config
from .tokenizer import write_tokenizer
from .writer import DEFAULT_SHARD_BYTES, FLOAT_DTYPES, SafetensorsShardWriter


@dataclass
class SynthReport:
    """What was written: where, how many parameters (logical) and bytes."""

    path: Path
    like: str
    config: dict[str, Any]
    parameters: int
    bytes_written: int
    shards: int

    def summary(self) -> str:
        """One line for the command line: shape, size and precision of the checkpoint."""
        q = self.config.get("quantization")
        how = f"{q['bits']}-bit (group size {q['group_size']})" if q else self.config["torch_dtype"]
        return (
            f"Wrote a synthetic {self.like} ({self.config['num_hidden_layers']} layers, "
            f"{self.parameters / 1e9:.3f}B parameters, {how}) to {self.path}: "
            f"{self.bytes_written / 2**30:.2f} GiB in {self.shards} shard(s)."
        )


def synthesize(
    like: str,
    out: Union[str, Path],
    *,
    bits: Optional[int] = None,
    group_size: int = 64,
    layers: Optional[int] = None,
    dtype: Optional[str] = None,
    seed: int = 0,
    overrides: Optional[dict[str, Any]] = None,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    force: bool = False,
) -> SynthReport:
    """Write a random-weight checkpoint of architecture `like` to `out`, streaming.

    The same arguments and `seed` give the same bytes. Shards left in `out` by an earlier
    run are removed first (with `force`), so a folder never mixes two checkpoints.
    """
    if bits is not None and bits not in (2, 3, 4, 6, 8):
        raise ValueError(f"bits must be one of 2, 3, 4, 6, 8; got {bits}.")
    if group_size not in (32, 64, 128):
        raise ValueError(f"group_size must be 32, 64 or 128; got {group_size}.")
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not force:
        raise FileExistsError(f"{out} exists and is not empty; choose a new folder or pass force.")
    config = architecture_config(like, layers, overrides)
    dtype = dtype or config.get("torch_dtype", "bfloat16")
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"dtype must be one of {sorted(FLOAT_DTYPES)}; got {dtype!r}.")
    plans, config = plan_tensors(config, dtype, bits, group_size)
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob("model*.safetensors*"):
        stale.unlink()
    by_name = {p.name: p for p in plans}
    writer = SafetensorsShardWriter(out, [(p.name, p.dtype, p.shape) for p in plans], shard_bytes)
    writer.write(lambda name: tensor_chunks(by_name[name], seed))
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    write_tokenizer(out, config)
    return SynthReport(out, like, config, logical_parameters(plans), writer.total_bytes, len(writer.names))
