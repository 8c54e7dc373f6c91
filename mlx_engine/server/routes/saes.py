"""SAEs attached to a loaded model over HTTP: attach, list, detach.

An attached SAE's features are a hook point (`{site}.sae_features`, mlx_engine/sae/attach.py):
captured by `activation_hooks` and edited by `interventions` like any other, named by the SAE's
id or by `"sae": "<id>"`. The SAE comes from a folder under a --sae-root or --model-root (a
relative folder, or an absolute path inside one) or from a Hugging Face repo id unless the
server runs with --no-hub; nothing else reaches the filesystem. Attaching and detaching run on
the engine thread, between generations, and refresh the model's hook-point listing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from flask import Blueprint, Response, jsonify

from ...hooks.listing import describe_hook_points
from ...hooks.names import HookSpecError
from ...sae.attach import attach_sae, attached_saes, detach_sae
from ...sae.formats import load_sae
from ...sae.model import SAEError
from ..errors import APIError
from ..loaded_models import REPO_ID, LoadedModel
from ..openapi import operation
from ..schemas.research import SAEAttachRequest, SAEList, SAEObject
from ..state import parse_body, state

bp = Blueprint("saes", __name__)
TAGS = ("SAEs",)
MODEL_PATH = {"model_id": "A loaded model id."}


def _forbidden(name: str, why: str) -> APIError:
    return APIError(f"Refusing to read SAE {name!r}: {why}", status=403, type="permission_error", param="source",
                    code="sae_path_not_allowed")


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def resolve_sae_source(source: str, folder: Optional[str], roots: tuple[Path, ...], allow_hub: bool) -> str:
    """What to pass to load_sae for a network request: a folder inside a root, or a Hub repo id."""
    for name, value in (("source", source), ("folder", folder or "")):
        if "\x00" in value or "\\" in value or ".." in Path(value).parts or (name == "folder" and value.startswith("/")):
            raise _forbidden(source, f"'{name}' may not hold '..', a NUL or a backslash, and a folder is relative.")
    resolved = [r.expanduser().resolve() for r in roots]
    path = Path(source)
    if path.is_absolute():
        target = path.resolve()
        if not any(_inside(target, r) for r in resolved):
            raise _forbidden(source, "absolute paths must lie inside an --sae-root or --model-root folder.")
        return str(target)
    for root in resolved:
        target = (root / path).resolve()
        if _inside(target, root) and target != root and target.is_dir():
            return str(target)
    if allow_hub and REPO_ID.match(source):
        if path.exists():
            raise _forbidden(source, "it names a local folder outside the SAE and model roots.")
        return source
    hub = " or a Hugging Face repo id 'owner/name'" if allow_hub else ""
    raise APIError(f"No SAE folder {source!r} under the SAE roots ({len(resolved) or 'none'} configured: --sae-root, "
                   f"--model-root); give a folder under a root{hub}.", status=404, type="not_found_error", param="source",
                   code="sae_not_found")


def _listing(model: LoadedModel) -> Response:
    return jsonify({"object": "list", "model": model.model_id, "data": attached_saes(model.kit)})


@bp.post("/v1/models/<model:model_id>/saes")
@operation(summary="Attach an SAE: its features become the hook point {site}.sae_features", tags=TAGS,
           request=SAEAttachRequest, response=SAEObject, path_params=MODEL_PATH,
           description="mlx_engine.attach_sae(kit, load_sae(source, folder=folder), hook=hook, top_k=top_k). The answer's "
           "`hook_id` is the SAE's id: name it in activation_hooks or interventions, or as `\"sae\": id`. An attached, "
           "unedited SAE changes no output.")
def attach(model_id: str) -> Response:
    req = parse_body(SAEAttachRequest)
    st = state()
    model = st.registry.get(model_id, param="model_id")
    roots = (*st.config.sae_roots, *st.config.model_roots)
    source = resolve_sae_source(req.source, req.folder, roots, st.config.allow_hub_models)

    def job() -> dict[str, Any]:
        try:
            handle = attach_sae(model.kit, load_sae(source, folder=req.folder), hook=req.hook, top_k=req.top_k)
        except (SAEError, HookSpecError) as exc:
            message = str(exc).removeprefix("activation_hooks[0]: ").replace(source, req.source)
            raise APIError(message, param="hook" if isinstance(exc, HookSpecError) else "source", code="invalid_sae") from None
        model.hook_listing = describe_hook_points(model.kit)
        return next(s for s in attached_saes(model.kit) if s["hook_id"] == handle.hook_id)

    entry = st.engine.call(job)
    return jsonify({"object": "sae", "id": entry["hook_id"], "model": model.model_id, **entry})


@bp.get("/v1/models/<model:model_id>/saes")
@operation(summary="The SAEs attached to a model", tags=TAGS, response=SAEList, path_params=MODEL_PATH)
def list_saes(model_id: str) -> Response:
    return _listing(state().registry.get(model_id, param="model_id"))


@bp.delete("/v1/models/<model:model_id>/saes/<sae_id>")
@operation(summary="Detach an SAE", tags=TAGS, response=SAEList,
           path_params={**MODEL_PATH, "sae_id": "An attached SAE's id (its feature hook id)."})
def detach(model_id: str, sae_id: str) -> Response:
    st = state()
    model = st.registry.get(model_id, param="model_id")
    if sae_id not in [s["hook_id"] for s in attached_saes(model.kit)]:
        raise APIError(f"No SAE {sae_id!r} is attached to {model.model_id!r}; GET /v1/models/{model.model_id}/saes lists them.",
                       status=404, type="not_found_error", param="sae_id", code="sae_not_found")

    def job() -> None:
        try:
            detach_sae(model.kit, sae_id)
        except SAEError as exc:
            raise APIError(str(exc), status=409, type="conflict_error", param="sae_id", code="sae_in_use") from None
        model.hook_listing = describe_hook_points(model.kit)

    st.engine.call(job)
    return _listing(model)
