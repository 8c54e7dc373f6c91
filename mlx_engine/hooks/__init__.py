"""The hook system: what can be captured, how requests name it, and the manager."""

from .capture import Capture, StepActivations
from .components import CORE_COMPONENTS, ComponentType
from .hook_point import HookPoint
from .manager import (
    ActivationHookManager,
    CaptureBudgetError,
    CaptureSession,
    HookBusyError,
    describe_hook_points,
    estimate_capture_bytes,
)
from .spec import ActivationHookSpec, HookSpecError, ResolvedHook, resolve_hook_specs as _resolve_specs


def resolve_hook_specs(kit, specs):  # type: ignore[no-untyped-def]
    """Resolve hook requests against a loaded model (raises HookSpecError listing what is valid)."""
    return _resolve_specs(kit.arch_info, specs, kit.native)


__all__ = [
    "ActivationHookManager",
    "ActivationHookSpec",
    "Capture",
    "CaptureBudgetError",
    "CaptureSession",
    "ComponentType",
    "CORE_COMPONENTS",
    "HookBusyError",
    "HookPoint",
    "HookSpecError",
    "ResolvedHook",
    "StepActivations",
    "describe_hook_points",
    "estimate_capture_bytes",
    "resolve_hook_specs",
]
