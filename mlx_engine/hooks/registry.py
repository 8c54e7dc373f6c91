"""Hooks registered for a model, kept resolved, for later runs that name none."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .listing import describe_hook_points
from .names import HookRequest, HookSpecError, ResolvedHook, resolve_hooks

if TYPE_CHECKING:
    from ..loading import ModelKit


class ActivationHookManager:
    """The hooks registered for a model (resolved once, at registration), and what the model offers."""

    def __init__(self, kit: "ModelKit") -> None:
        self.kit = kit
        self._hooks: dict[str, ResolvedHook] = {}

    def register_hook(self, spec: HookRequest) -> list[str]:
        """Validate and keep a hook; returns the hook id(s) it captures under."""
        resolved = resolve_hooks(self.kit.arch_info, self.kit.native, [spec])
        for r in resolved:
            if r.hook_id in self._hooks:
                raise HookSpecError(f"Hook id {r.hook_id!r} is already registered; unregister it first.")
        for r in resolved:
            self._hooks[r.hook_id] = r
        return [r.hook_id for r in resolved]

    def unregister_hook(self, hook_id: str) -> None:
        if hook_id not in self._hooks:
            raise KeyError(f"No hook {hook_id!r} is registered; registered: {sorted(self._hooks)}.")
        del self._hooks[hook_id]

    def clear_all_hooks(self) -> None:
        self._hooks.clear()

    def list_hooks(self) -> list[dict[str, Any]]:
        return [r.listing() for r in self._hooks.values()]

    @property
    def resolved_hooks(self) -> list[ResolvedHook]:
        return list(self._hooks.values())

    def hook_points(self) -> dict[str, Any]:
        """The model's hook-point listing (JSON-ready)."""
        return describe_hook_points(self.kit)
