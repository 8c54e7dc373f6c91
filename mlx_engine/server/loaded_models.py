"""The models a server has loaded, the hooks registered on each, and where models may come from.

Request threads read this registry (model list, hook points, registered hooks) without
waiting for the engine: everything kept here besides the kit itself is plain Python
computed at load time. Only engine-thread jobs use `LoadedModel.kit`, except its
`arch_info` and `native` flag (plain data fixed at load), which request threads read to
check interventions before queueing.

Load requests come from the network, so a name may only reach the filesystem through
a configured model root: a relative folder under a root, or an absolute path that
resolves (symlinks followed) inside one, whose files do not link outside the roots.
Anything else must be a Hugging Face repo id. Refusals name the request's own model
name, never a root (the error redactor cuts any root out of a name that contains it).
"""

from __future__ import annotations

import os
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from ..generation.harmony import HarmonyTokens
from ..hooks.listing import describe_hook_points
from ..hooks.names import HookSpecError, ResolvedHook, resolve_hooks
from ..hooks.registry import ActivationHookManager
from ..loading import DEFAULT_MODEL_NAME, ModelKit
from .context import PromptLimits
from .errors import APIError, ModelNotFound

REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$")


@dataclass
class LoadedModel:
    model_id: str
    kit: ModelKit
    created: int
    source: str
    hook_listing: dict[str, Any]  # the JSON listing (kit.hook_points are the live HookPoints)
    harmony_tokens: Optional[HarmonyTokens]
    hooks: ActivationHookManager
    limits: PromptLimits  # context window, prompt limit and the tokens-per-byte bound (plain data)
    hooks_lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def build(cls, model_id: str, kit: ModelKit, source: str, max_prompt_tokens: int = 0) -> "LoadedModel":
        """Everything request threads will need, computed once (on the engine thread)."""
        harmony = HarmonyTokens.from_vocab(kit.tokenizer.get_vocab()) if kit.is_harmony else None
        return cls(
            model_id=model_id,
            kit=kit,
            created=int(time.time()),
            source=source,
            hook_listing=describe_hook_points(kit),
            harmony_tokens=harmony,
            hooks=ActivationHookManager(kit),
            limits=PromptLimits.for_model(kit.config, kit.tokenizer, max_prompt_tokens),
        )

    def describe(self) -> dict[str, Any]:
        """The OpenAI model object, with what an interpretability client wants to know."""
        info = self.kit.arch_info
        return {
            "id": self.model_id,
            "object": "model",
            "created": self.created,
            "owned_by": "mlx-engine",
            "model_type": self.kit.model_type,
            "native": self.kit.native,
            "harmony": self.harmony_tokens is not None,
            "num_layers": info.num_layers,
            "d_model": info.d_model,
            "context_length": self.limits.context,
        }

    # -- registered hooks (pure Python; guarded because several request threads share them)
    def register_hooks(self, specs: list[Any]) -> list[dict[str, Any]]:
        """Register all or none: a bad spec leaves the registry unchanged."""
        with self.hooks_lock:
            added: list[str] = []
            try:
                for spec in specs:
                    added.extend(self.hooks.register_hook(spec))
            except HookSpecError:
                for hook_id in added:
                    self.hooks.unregister_hook(hook_id)
                raise
            return self.hooks.list_hooks()

    def list_hooks(self) -> list[dict[str, Any]]:
        with self.hooks_lock:
            return self.hooks.list_hooks()

    def unregister_hooks(self, hook_id: Optional[str]) -> list[dict[str, Any]]:
        with self.hooks_lock:
            if hook_id is None:
                self.hooks.clear_all_hooks()
            else:
                try:
                    self.hooks.unregister_hook(hook_id)
                except KeyError as exc:
                    raise APIError(str(exc.args[0]), status=404, type="not_found_error", param="hook_id", code="hook_not_found") from None
            return self.hooks.list_hooks()

    def registered_hooks(self) -> list[ResolvedHook]:
        """The registered hooks, resolved when they were registered (one per hook id)."""
        with self.hooks_lock:
            return self.hooks.resolved_hooks

    def resolve_hooks(self, specs: list[Any]) -> list[ResolvedHook]:
        """A request's hooks resolved once, on the request thread (arch_info is plain data)."""
        return resolve_hooks(self.kit.arch_info, self.kit.native, specs)


class ModelRegistry:
    """Loaded models by id. Mutated only by engine-thread jobs; read from anywhere."""

    def __init__(self) -> None:
        self._models: dict[str, LoadedModel] = {}
        self._lock = threading.Lock()

    def add(self, model: LoadedModel) -> None:
        with self._lock:
            self._models[model.model_id] = model

    def remove(self, model_id: str) -> LoadedModel:
        with self._lock:
            model = self._models.pop(model_id, None)
            if model is None:
                raise ModelNotFound(model_id, sorted(self._models))
            return model

    def find(self, model_id: str) -> Optional[LoadedModel]:
        with self._lock:
            return self._models.get(model_id)

    def get(self, model_id: Optional[str], param: str = "model") -> LoadedModel:
        """The named model, or the only loaded one when no name is given."""
        with self._lock:
            if model_id is None:
                if len(self._models) == 1:
                    return next(iter(self._models.values()))
                raise APIError(
                    f"Name a model: {len(self._models)} are loaded ({sorted(self._models) or 'none'}).",
                    param=param,
                    code="model_required",
                )
            model = self._models.get(model_id)
            if model is None:
                raise ModelNotFound(model_id, sorted(self._models), param=param)
            return model

    def all(self) -> list[LoadedModel]:
        with self._lock:
            return list(self._models.values())

    def ids(self) -> list[str]:
        with self._lock:
            return list(self._models)


def _forbidden(name: str, why: str) -> APIError:
    return APIError(f"Refusing to load {name!r}: {why}", status=403, type="permission_error", param="model", code="model_path_not_allowed")


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def _link_outside(folder: Path, roots: list[Path]) -> Optional[str]:
    """The first entry under `folder` (by its path within it) that is a symbolic link resolving
    outside every root; linked folders inside the roots are searched too, each once."""
    pending, seen = [folder], set()
    while pending:
        current = pending.pop()
        real = current.resolve()
        if real in seen:
            continue
        seen.add(real)
        try:
            entries = sorted(os.scandir(current), key=lambda e: e.name)
        except OSError:
            continue
        for entry in entries:
            path = Path(entry.path)
            if entry.is_symlink() and not any(_inside(path.resolve(), r) for r in roots):
                return path.relative_to(folder).as_posix()
            if entry.is_dir():
                pending.append(path)
    return None


def _checked_folder(target: Path, model_id: str, roots: list[Path]) -> tuple[str, str]:
    link = _link_outside(target, roots)
    if link is not None:
        raise _forbidden(model_id, f"its file {link!r} is a symbolic link to a place outside the model roots.")
    return str(target), model_id


def resolve_load_request(name: str, roots: tuple[Path, ...], allow_hub: bool) -> tuple[str, str]:
    """(what to pass to load_model, the model id to serve it under) for a network load request."""
    if "\x00" in name or "\\" in name:
        raise _forbidden(name, "the name contains a NUL or backslash character.")
    if name == DEFAULT_MODEL_NAME:
        return DEFAULT_MODEL_NAME, DEFAULT_MODEL_NAME
    resolved_roots = [r.expanduser().resolve() for r in roots]
    path = Path(name)
    if ".." in path.parts:
        raise _forbidden(name, "'..' is not allowed in a model path.")
    if path.is_absolute():
        target = path.resolve()
        root = next((r for r in resolved_roots if _inside(target, r)), None)
        if root is None:
            raise _forbidden(name, "absolute paths must lie inside a --model-root folder.")
        if not (target / "config.json").is_file():
            raise APIError(f"{name!r} is not a model folder (no config.json).", status=404, type="not_found_error", param="model", code="model_not_found")
        return _checked_folder(target, target.relative_to(root).as_posix() or target.name, resolved_roots)
    for root in resolved_roots:
        target = (root / path).resolve()
        if _inside(target, root) and target != root and (target / "config.json").is_file():
            return _checked_folder(target, path.as_posix(), resolved_roots)
    if REPO_ID.match(name) and allow_hub:
        if Path(name).exists():
            # load_model would read this local folder (relative to the server's working
            # directory), which is not a model root.
            raise _forbidden(name, "it names a local folder outside the model roots.")
        return name, name
    roots_text = f"{len(resolved_roots)} configured" if resolved_roots else "none configured"
    hub = " or a Hugging Face repo id 'owner/name'" if allow_hub else ""
    raise APIError(
        f"No model folder {name!r} under the model roots ({roots_text}); give a folder under a root{hub}.",
        status=404,
        type="not_found_error",
        param="model",
        code="model_not_found",
    )
