"""Conversion of the trained float checkpoint into the 4-bit MLX model embedded in the
package at ``mlx_engine/default_model/`` (at most 20 MB), with ``mlx_engine.tools.convert``.

Only the quantized conversion is committed: the float checkpoint is several times larger
and the engine loads the 4-bit one anyway.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from . import log

REPO_ROOT = Path(__file__).resolve().parents[2]
PACKAGED_DIR = REPO_ROOT / "mlx_engine" / "default_model"
PACKAGED_LIMIT_BYTES = 20 * 1024 * 1024
EXIT_CONVERTER_MISSING = 3
EXIT_PACKAGE_TOO_LARGE = 4


def directory_size(path: Path) -> int:
    """Bytes in all files under ``path``: what the package grows by."""
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def convert_to_package(float_dir: Path, packaged_dir: Path, bits: int, group_size: int) -> int:
    """Write the 4-bit MLX conversion of ``float_dir`` to ``packaged_dir``; returns an exit code.

    The conversion goes to a scratch folder first and replaces the packaged model only when
    it succeeded and fits the size limit, so a failed run never leaves a half-written package.
    """
    try:
        from mlx_engine.tools.convert import quantize_checkpoint
    except ImportError as exc:
        log(
            "cannot convert: mlx_engine.tools.convert.quantize_checkpoint is not importable "
            f"({exc}). The float checkpoint in {float_dir} is complete; rerun with --convert-only "
            "once the converter exists."
        )
        return EXIT_CONVERTER_MISSING
    if not (float_dir / "config.json").is_file():
        log(f"cannot convert: {float_dir} holds no checkpoint (config.json missing); train first")
        return 2
    scratch = float_dir.parent / (float_dir.name + f"-mlx-{bits}bit")
    if scratch.exists():
        shutil.rmtree(scratch)
    log(f"converting {float_dir} to {bits}-bit MLX (group size {group_size})")
    quantize_checkpoint(float_dir, scratch, bits=bits, group_size=group_size)
    report = float_dir / "training_report.json"
    if report.is_file():
        shutil.copy2(report, scratch / "training_report.json")
    size = directory_size(scratch)
    if size > PACKAGED_LIMIT_BYTES:
        log(f"conversion is {size / 2**20:.1f} MiB, over the {PACKAGED_LIMIT_BYTES / 2**20:.0f} MiB limit; not packaged")
        return EXIT_PACKAGE_TOO_LARGE
    if packaged_dir.exists():
        shutil.rmtree(packaged_dir)
    packaged_dir.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(scratch), str(packaged_dir))
    log(f"packaged {packaged_dir} ({size / 2**20:.2f} MiB)")
    return 0
