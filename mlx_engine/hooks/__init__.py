"""The hook system: what can be captured (components), how a request names it (names),
what one pass captured (capture), arming a run's sites (session), registered hooks
(registry), the listing clients read (listing) and the capture budget (budget)."""

from .architecture import ArchitectureInfo
from .budget import CaptureBudgetError, estimate_capture_bytes
from .capture import Capture, StepActivations
from .components import CORE_COMPONENTS, ComponentType
from .listing import describe_hook_points
from .names import ActivationHookSpec, HookSpecError, ResolvedHook, resolve_hooks
from .point import HookPoint
from .registry import ActivationHookManager
from .session import HookBusyError, HookSession

__all__ = [
    "ActivationHookManager",
    "ActivationHookSpec",
    "ArchitectureInfo",
    "Capture",
    "CaptureBudgetError",
    "ComponentType",
    "CORE_COMPONENTS",
    "HookBusyError",
    "HookPoint",
    "HookSession",
    "HookSpecError",
    "ResolvedHook",
    "StepActivations",
    "describe_hook_points",
    "estimate_capture_bytes",
    "resolve_hooks",
]
