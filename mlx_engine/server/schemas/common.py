"""What the request and response schemas share: the strict base model and the request limits."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

MAX_STOP_SEQUENCES = 16
MAX_HOOKS = 256
MAX_TOP_LOGPROBS = 20
MAX_INTERVENTIONS = 64
MAX_STEERING_PROMPTS = 256


class StrictModel(BaseModel):
    """Strict validation: a string is not a number, and an unknown field is an error."""

    model_config = ConfigDict(strict=True, extra="forbid")
