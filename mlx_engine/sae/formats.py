"""SAE files: SAELens's format (cfg.json + sae_weights.safetensors), Gemma Scope's params.npz, the Hub.

`save_sae` writes what SAELens 6's `SAE.load_from_disk` reads: cfg.json with `architecture`,
`d_in`, `d_sae`, `dtype`, `apply_b_dec_to_input`, `normalize_activations`,
`reshape_activations` (+ `k`, `rescale_acts_by_decoder_norm` for TopK, `d_out` for
transcoders) and `metadata` (`hook_name`, `hook_name_out`, `model_name`, `context_size`,
`sae_lens_version`), and the weights W_enc, W_dec, b_enc, b_dec (+ threshold) by those names.
`load_sae` reads that format (and the pre-6 one: `hook_point`, `activation_fn_str`), Gemma
Scope's raw release (params.npz; JumpReLU without b_dec on the input, hook inferred from the
path as SAELens does: `layer_N` in a `-res`, `-mlp` or `-att` release), from a local folder or
a Hub repo id (`owner/name` or `owner/name/sub/folder`) through huggingface_hub, which
honours HF_HUB_OFFLINE (the local cache only). Hook names are TransformerLens names
(`blocks.5.hook_resid_post`); hooks/names.py resolves them to this engine's sites, and
`transformerlens_name` maps a site back.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Optional, Union

import mlx.core as mx
import numpy as np

from ..hooks.names import TRANSFORMERLENS_BLOCK_ALIASES, ResolvedHook
from .model import FILE_ARCHITECTURES, SAE, SAEConfig, SAEError

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
GEMMA_SCOPE_FILE = "params.npz"
# The cfg layout SAELens 6 reads (it parses configs without metadata.sae_lens_version, or
# with one below 6, as its older format).
SAELENS_FORMAT_VERSION = "6.0.0"
_FIELDS = ("d_in", "d_sae", "d_out", "k", "rescale_acts_by_decoder_norm", "apply_b_dec_to_input",
           "normalize_activations", "reshape_activations", "dtype")
_META_FIELDS = ("hook_name", "hook_name_out", "model_name", "context_size")

SAESource = Union[str, Path]


def config_to_dict(cfg: SAEConfig) -> dict[str, Any]:
    """cfg.json as SAELens 6 writes it."""
    out: dict[str, Any] = {
        "architecture": cfg.file_architecture, "d_in": cfg.d_in, "d_sae": cfg.d_sae, "dtype": cfg.dtype, "device": "cpu",
        "apply_b_dec_to_input": cfg.apply_b_dec_to_input, "normalize_activations": cfg.normalize_activations,
        "reshape_activations": cfg.reshape_activations,
    }
    if cfg.architecture == "topk":
        out.update(k=cfg.k, rescale_acts_by_decoder_norm=cfg.rescale_acts_by_decoder_norm)
    if cfg.transcoder:
        out["d_out"] = cfg.d_out
    meta = {"sae_lens_version": SAELENS_FORMAT_VERSION, **cfg.metadata}
    for name in _META_FIELDS:
        if getattr(cfg, name) is not None:
            meta[name] = getattr(cfg, name)
    out["metadata"] = meta
    out.update({k: v for k, v in cfg.extra.items() if k not in out})
    return out


def _legacy(d: dict[str, Any]) -> dict[str, Any]:
    """A pre-6 SAELens cfg in the 6 layout (SAELens's handle_pre_6_0_config)."""
    d = {{"hook_point": "hook_name", "activation_fn_str": "activation_fn"}.get(k, k): v for k, v in d.items()}
    d.setdefault("architecture", "standard")
    if d.get("activation_fn") == "topk" and (d.get("activation_fn_kwargs") or {}).get("k") is not None:
        d["architecture"], d["k"] = "topk", d["activation_fn_kwargs"]["k"]
    norm = d.get("normalize_activations")
    if isinstance(norm, bool) or norm is None:
        d["normalize_activations"] = "expected_average_only_in" if norm else "none"
    d["metadata"] = {k: d.pop(k) for k in list(d) if k in _META_FIELDS}
    return d


def config_from_dict(raw: dict[str, Any]) -> SAEConfig:
    """An SAEConfig from cfg.json (SAELens 6, or the older layout); unknown keys are kept for writing back."""
    if not isinstance(raw, dict):
        raise SAEError(f"cfg.json must hold a JSON object, got {type(raw).__name__}.")
    d = dict(raw)
    meta = d.get("metadata") if isinstance(d.get("metadata"), dict) else None
    version = (meta or {}).get("sae_lens_version") or d.get("sae_lens_version")
    major = re.match(r"\d+", str(version or ""))
    if meta is None or major is None or int(major.group()) < 6:
        d = _legacy(d)
    meta = dict(d.pop("metadata") or {})
    if meta.get("sae_lens_version") == SAELENS_FORMAT_VERSION:  # the marker save_sae writes back itself
        del meta["sae_lens_version"]
    arch = d.pop("architecture", "standard")
    if arch not in FILE_ARCHITECTURES:
        raise SAEError(f"Unknown SAE architecture {arch!r}; supported: {', '.join(FILE_ARCHITECTURES)}.")
    activation, transcoder = FILE_ARCHITECTURES[arch]
    fields: dict[str, Any] = {}
    for name in _FIELDS:
        if name in d:
            fields[name] = d.pop(name)
    if activation != "topk":
        fields.pop("k", None)
        fields.pop("rescale_acts_by_decoder_norm", None)
    if isinstance(fields.get("dtype"), str):
        fields["dtype"] = fields["dtype"].removeprefix("torch.")
    for name in ("d_in", "d_sae"):
        if name not in fields:
            raise SAEError(f"cfg.json has no {name!r}.")
    for name in _META_FIELDS:
        value = meta.pop(name, d.pop(name, None))
        if value is not None:
            fields[name] = value
    d.pop("device", None)
    return SAEConfig(architecture=activation, transcoder=transcoder, metadata=meta, extra=d, **fields)


def save_sae(sae: SAE, folder: Union[str, Path]) -> Path:
    """Write `sae` to `folder` in SAELens's format (cfg.json + sae_weights.safetensors); returns the folder."""
    folder = Path(folder).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{WEIGHTS_FILE}.tmp.safetensors"
    mx.save_safetensors(str(tmp), sae.arrays(), metadata={"format": "pt"})
    os.replace(tmp, folder / WEIGHTS_FILE)
    text = json.dumps(config_to_dict(sae.cfg), indent=2) + "\n"
    tmp_cfg = folder / f".{CFG_FILE}.tmp"
    tmp_cfg.write_text(text, encoding="utf-8")
    os.replace(tmp_cfg, folder / CFG_FILE)
    return folder


def _read_saelens(path: Path) -> SAE:
    try:
        raw = json.loads((path / CFG_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise SAEError(f"{path / CFG_FILE} cannot be read: {exc}") from None
    cfg = config_from_dict(raw)
    weights = path / WEIGHTS_FILE
    if not weights.exists():
        raise SAEError(f"{path} has {CFG_FILE} but no {WEIGHTS_FILE}.")
    arrays = dict(mx.load(str(weights)))
    if "log_threshold" in arrays:  # older JumpReLU files train log(threshold) (SAELens converts it the same way)
        arrays["threshold"] = mx.exp(arrays.pop("log_threshold"))
    scaling = arrays.pop("scaling_factor", None)
    if scaling is not None and not bool(mx.all(scaling == 1).item()):
        raise SAEError(f"{weights} holds a fine-tuning scaling_factor other than 1, which this engine does not apply.")
    return SAE(cfg, arrays)


def _gemma_scope_hook(path: Path) -> Optional[str]:
    """The TransformerLens hook of a Gemma Scope folder (.../gemma-scope-2b-pt-res/layer_20/width_16k/...),
    as SAELens's loader reads it: `layer_N`, and the release's kind (res, mlp, att)."""
    layer = next((int(m.group(1)) for part in path.parts for m in [re.fullmatch(r"layer_(\d+)", part)] if m), None)
    kind = next((m.group(1) for part in path.parts for m in [re.search(r"-(res|mlp|att)(?:-|$)", part)] if m), None)
    if layer is None or kind is None:
        return None
    return {"res": f"blocks.{layer}.hook_resid_post", "mlp": f"blocks.{layer}.hook_mlp_out", "att": f"blocks.{layer}.attn.hook_z"}[kind]


def _read_gemma_scope(path: Path, hook: Optional[str]) -> SAE:
    with np.load(path / GEMMA_SCOPE_FILE) as z:
        arrays = {("W_" + k[2:]) if k.startswith("w_") else k: np.asarray(z[k], dtype=np.float32) for k in z.files}
    hook = hook or _gemma_scope_hook(path)
    if hook is None:
        raise SAEError(f"the Gemma Scope SAE in {path} does not say its hook (no layer_N in a -res/-mlp/-att path); pass hook=.")
    if "W_enc" not in arrays:
        raise SAEError(f"{path / GEMMA_SCOPE_FILE} has no W_enc (it holds {', '.join(sorted(arrays))}).")
    d_in, d_sae = arrays["W_enc"].shape
    cfg = SAEConfig(
        "jumprelu", d_in=int(d_in), d_sae=int(d_sae), apply_b_dec_to_input=False, hook_name=hook,
        reshape_activations="hook_z" if hook.endswith("hook_z") else "none", metadata={"source": "gemma-scope params.npz"},
    )
    return SAE(cfg, arrays)


def _hub_folder(source: str, folder: Optional[str], revision: Optional[str]) -> Path:
    parts = source.strip("/").split("/")
    repo_id, sub = "/".join(parts[:2]), "/".join(p for p in [*parts[2:], *(folder.strip("/").split("/") if folder else [])] if p)
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    prefix = f"{sub}/" if sub else ""
    patterns = [prefix + name for name in (CFG_FILE, WEIGHTS_FILE, GEMMA_SCOPE_FILE)]
    try:
        root = Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except LocalEntryNotFoundError:
        raise SAEError(
            f"SAE {source!r}: {repo_id} is not in the local Hugging Face cache and the Hub cannot be reached "
            "(HF_HUB_OFFLINE is set, or there is no connection); download it once online or give a local folder."
        ) from None
    except (HfHubHTTPError, OSError, ValueError) as exc:
        raise SAEError(f"SAE {source!r}: could not fetch {repo_id} from the Hub: {exc}") from None
    return root / sub if sub else root


def load_sae(
    source: Union[SAESource, SAE], *, folder: Optional[str] = None, hook: Optional[str] = None, revision: Optional[str] = None
) -> SAE:
    """An SAE from a folder (SAELens format or Gemma Scope's params.npz) or a Hub repo id.

    `folder` is a subfolder of the source (a repo with many SAEs, e.g. `blocks.8.hook_resid_pre`
    or `layer_20/width_16k/average_l0_71`); `hook` overrides the hook name the file gives.
    """
    if isinstance(source, SAE):
        return source.with_config(hook_name=hook) if hook else source
    local = Path(str(source)).expanduser()
    if local.exists():
        path = local / folder if folder else local
    elif str(source).startswith((".", "/", "~")) or str(source).count("/") < 1:
        raise SAEError(f"SAE {str(source)!r} not found: no folder at {local.resolve()}, and it is not a Hub repo id 'owner/name'.")
    else:
        path = _hub_folder(str(source), folder, revision)
    if not path.is_dir():
        raise SAEError(f"{path} is not a folder holding an SAE.")
    if (path / CFG_FILE).exists():
        sae = _read_saelens(path)
        return sae.with_config(hook_name=hook) if hook else sae
    if (path / GEMMA_SCOPE_FILE).exists():
        return _read_gemma_scope(path, hook)
    raise SAEError(f"{path} holds no SAE: neither {CFG_FILE} + {WEIGHTS_FILE} (SAELens) nor {GEMMA_SCOPE_FILE} (Gemma Scope).")


def transformerlens_name(hook: ResolvedHook) -> str:
    """The TransformerLens name of a resolved hook (`blocks.5.hook_resid_post`); its hook id where there is none."""
    if hook.site == "embedding":
        return "hook_embed"
    if hook.site == "final_norm":
        return "ln_final.hook_normalized"
    if hook.indices is None and hook.layer is not None:
        for suffix, (component, is_input) in TRANSFORMERLENS_BLOCK_ALIASES.items():
            if component is hook.component and is_input == hook.is_input:
                return f"blocks.{hook.layer}.{suffix}"
    return hook.hook_id
