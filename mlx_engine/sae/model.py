"""The SAE itself, in MLX: SAELens's architectures, their forward pass, and the arrays a file holds.

The conventions are SAELens 6's (sae_lens/saes/*.py), so a file moves between the two unchanged:
W_enc [d_in, d_sae], W_dec [d_sae, d_out], b_enc [d_sae], b_dec [d_out], threshold [d_sae].

    sae_in     = norm_in(x) - b_dec * apply_b_dec_to_input
    hidden_pre = sae_in @ W_enc + b_enc           (topk with rescale_acts_by_decoder_norm: * |W_dec_i|)
    standard   f = relu(hidden_pre)
    topk       f = relu of the k largest hidden_pre of each position, 0 elsewhere (exactly k kept)
    jumprelu   f = relu(hidden_pre) * (hidden_pre > threshold)
    decode     x_hat = norm_out(f @ W_dec + b_dec) (rescale: f / |W_dec_i| first)

`norm_in`/`norm_out` are SAELens's run-time normalisations: "constant_norm_rescale" (each
position scaled to norm sqrt(d_in)) and "layer_norm" (centred, divided by the unbiased std
plus 1e-5); "none" and "expected_average_only_in" do nothing at run time, as in SAELens
(a dataset-wide constant is folded into the weights when a file is written). A transcoder
(`cfg.transcoder`) reads one hook and predicts another, so d_out may differ from d_in; its
architecture names are SAELens's "transcoder" and "jumprelu_transcoder", and "topk_transcoder"
for TopK (an architecture of this engine: SAELens has no TopK transcoder).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Mapping, Optional

import mlx.core as mx
import numpy as np

# File architecture -> (activation, transcoder)
FILE_ARCHITECTURES: dict[str, tuple[str, bool]] = {
    "standard": ("standard", False),
    "topk": ("topk", False),
    "jumprelu": ("jumprelu", False),
    "transcoder": ("standard", True),
    "jumprelu_transcoder": ("jumprelu", True),
    "topk_transcoder": ("topk", True),
}
NORMALIZATIONS = ("none", "expected_average_only_in", "constant_norm_rescale", "layer_norm")
RESHAPES = ("none", "hook_z")
DTYPES = ("float32", "float16", "bfloat16")
LAYER_NORM_EPS = 1e-5


class SAEError(ValueError):
    """An SAE (or a request about one) that cannot be used as given; the message says why."""


@dataclass
class SAEConfig:
    """What an SAE computes and where it reads: SAELens's cfg.json fields (metadata flattened).

    `metadata` keeps every metadata key of the file this engine does not read itself, and
    `extra` every top-level key, so writing a loaded SAE back loses nothing.
    """

    architecture: str  # the activation: "standard", "topk" or "jumprelu"
    d_in: int
    d_sae: int
    d_out: Optional[int] = None  # the transcoder's output width; an SAE's is d_in
    transcoder: bool = False
    k: Optional[int] = None
    rescale_acts_by_decoder_norm: bool = False
    apply_b_dec_to_input: bool = True
    normalize_activations: str = "none"
    reshape_activations: str = "none"
    dtype: str = "float32"
    hook_name: Optional[str] = None
    hook_name_out: Optional[str] = None
    model_name: Optional[str] = None
    context_size: Optional[int] = None
    metadata: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.architecture not in ("standard", "topk", "jumprelu"):
            raise SAEError(f"Unknown SAE architecture {self.architecture!r}; supported: {', '.join(FILE_ARCHITECTURES)}.")
        for name in ("d_in", "d_sae"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise SAEError(f"{name} must be a positive integer, got {value!r}.")
        if self.d_out is None:
            self.d_out = self.d_in
        if not self.transcoder and self.d_out != self.d_in:
            raise SAEError(f"an SAE reconstructs its input: d_out ({self.d_out}) must equal d_in ({self.d_in}); a transcoder may differ.")
        if self.architecture == "topk" and (isinstance(self.k, bool) or not isinstance(self.k, int) or not 1 <= self.k <= self.d_sae):
            raise SAEError(f"a TopK SAE needs k in 1..d_sae ({self.d_sae}), got {self.k!r}.")
        if self.normalize_activations not in NORMALIZATIONS:
            raise SAEError(f"normalize_activations must be one of {', '.join(NORMALIZATIONS)}, got {self.normalize_activations!r}.")
        if self.reshape_activations not in RESHAPES:
            raise SAEError(f"reshape_activations must be one of {', '.join(RESHAPES)}, got {self.reshape_activations!r}.")
        if self.dtype not in DTYPES:
            raise SAEError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}.")

    @property
    def file_architecture(self) -> str:
        """The architecture name written to cfg.json (SAELens's, or topk_transcoder)."""
        if not self.transcoder:
            return self.architecture
        return {"standard": "transcoder", "jumprelu": "jumprelu_transcoder", "topk": "topk_transcoder"}[self.architecture]


def top_k_relu(hidden_pre: mx.array, k: int) -> mx.array:
    """ReLU of the k largest entries of each row, 0 elsewhere: exactly k kept (SAELens's TopK)."""
    if k >= hidden_pre.shape[-1]:
        return mx.maximum(hidden_pre, 0)
    ids = mx.stop_gradient(mx.argpartition(-hidden_pre, kth=k - 1, axis=-1)[..., :k])
    values = mx.take_along_axis(hidden_pre, ids, axis=-1)
    return mx.put_along_axis(mx.zeros_like(hidden_pre), ids, mx.maximum(values, 0), axis=-1)


@dataclass
class NormState:
    """What a run-time normalisation of the input needs to undo it on the output (per position)."""

    scale: Optional[mx.array] = None  # output = y * scale (+ shift)
    shift: Optional[mx.array] = None


class SAE:
    """An SAE's weights and its forward pass (see the module docstring for the equations)."""

    def __init__(self, cfg: SAEConfig, arrays: Mapping[str, Any]) -> None:
        self.cfg = cfg
        expected = {
            "W_enc": (cfg.d_in, cfg.d_sae), "W_dec": (cfg.d_sae, cfg.d_out), "b_enc": (cfg.d_sae,), "b_dec": (cfg.d_out,),
        }
        if cfg.architecture == "jumprelu":
            expected["threshold"] = (cfg.d_sae,)
        missing = sorted(set(expected) - set(arrays))
        if missing:
            raise SAEError(f"the {cfg.file_architecture} SAE's weights lack {', '.join(missing)} (they hold {', '.join(sorted(arrays))}).")
        unknown = sorted(set(arrays) - set(expected))
        if unknown:
            raise SAEError(f"the {cfg.file_architecture} SAE's weights hold {', '.join(unknown)}, which this architecture does not use.")
        dtype = getattr(mx, cfg.dtype)
        self.params: dict[str, mx.array] = {}
        for name, shape in expected.items():
            value = arrays[name]
            array = value if isinstance(value, mx.array) else mx.array(np.asarray(value))
            if tuple(array.shape) != shape:
                raise SAEError(
                    f"{name} has shape {list(array.shape)} but the config (d_in={cfg.d_in}, d_sae={cfg.d_sae}, "
                    f"d_out={cfg.d_out}) needs {list(shape)}."
                )
            self.params[name] = array.astype(dtype) if array.dtype != dtype else array

    def __getattr__(self, name: str) -> mx.array:
        params = self.__dict__.get("params", {})
        if name in params:
            return params[name]
        raise AttributeError(name)

    @property
    def d_in(self) -> int:
        return self.cfg.d_in

    @property
    def d_sae(self) -> int:
        return self.cfg.d_sae

    def _check(self, x: mx.array) -> None:
        if x.ndim < 1 or x.shape[-1] != self.cfg.d_in:
            where = f" ({self.cfg.hook_name})" if self.cfg.hook_name else ""
            raise SAEError(f"activations of width {x.shape[-1] if x.ndim else 0} cannot be encoded: this SAE{where} reads d_in={self.cfg.d_in}.")

    def normalize_in(self, x: mx.array) -> tuple[mx.array, NormState]:
        """The run-time input normalisation and what undoes it on the output."""
        mode = self.cfg.normalize_activations
        if mode == "constant_norm_rescale":
            coeff = (self.cfg.d_in ** 0.5) / mx.linalg.norm(x, axis=-1, keepdims=True)
            return x * coeff, NormState(scale=1 / coeff)
        if mode == "layer_norm":
            mu = mx.mean(x, axis=-1, keepdims=True)
            centred = x - mu
            std = mx.sqrt(mx.sum(centred * centred, axis=-1, keepdims=True) / (x.shape[-1] - 1))
            return centred / (std + LAYER_NORM_EPS), NormState(scale=std, shift=mu)
        return x, NormState()

    def hidden_pre(self, x: mx.array) -> tuple[mx.array, NormState]:
        """Pre-activations (after any decoder-norm rescaling) and the normalisation state."""
        self._check(x)
        p = self.params
        x = x.astype(p["W_enc"].dtype)
        sae_in, state = self.normalize_in(x)
        if self.cfg.apply_b_dec_to_input:
            sae_in = sae_in - p["b_dec"]
        pre = sae_in @ p["W_enc"] + p["b_enc"]
        if self.cfg.architecture == "topk" and self.cfg.rescale_acts_by_decoder_norm:
            pre = pre * mx.linalg.norm(p["W_dec"], axis=-1)
        return pre, state

    def activate(self, pre: mx.array) -> mx.array:
        """Feature activations from pre-activations."""
        arch = self.cfg.architecture
        if arch == "topk":
            return top_k_relu(pre, int(self.cfg.k))  # type: ignore[arg-type]
        acts = mx.maximum(pre, 0)
        if arch == "jumprelu":
            acts = acts * (pre > self.params["threshold"]).astype(acts.dtype)
        return acts

    def encode_with_state(self, x: mx.array) -> tuple[mx.array, NormState]:
        pre, state = self.hidden_pre(x)
        return self.activate(pre), state

    def encode(self, x: mx.array) -> mx.array:
        """Feature activations [..., d_sae] of activations x [..., d_in]."""
        return self.encode_with_state(x)[0]

    def _times_decoder(self, f: mx.array) -> mx.array:
        w = self.params["W_dec"]
        if self.cfg.architecture == "topk" and self.cfg.rescale_acts_by_decoder_norm:
            f = f / mx.linalg.norm(w, axis=-1)
        return f @ w

    def decode(self, f: mx.array, state: Optional[NormState] = None) -> mx.array:
        """The reconstruction [..., d_out] (the state of the input's normalisation, where it has one)."""
        out = self._times_decoder(f) + self.params["b_dec"]
        return self._denormalize(out, state, shift=True)

    def delta(self, df: mx.array, state: Optional[NormState] = None) -> mx.array:
        """decode(f + df) - decode(f): df through the decoder, without the bias."""
        return self._denormalize(self._times_decoder(df), state, shift=False)

    def _denormalize(self, y: mx.array, state: Optional[NormState], shift: bool) -> mx.array:
        if self.cfg.normalize_activations in ("constant_norm_rescale", "layer_norm"):
            if state is None or state.scale is None:
                raise SAEError(f"decoding a {self.cfg.normalize_activations} SAE needs the input's normalisation state (encode_with_state).")
            y = y * state.scale
            if shift and state.shift is not None:
                y = y + state.shift
        return y

    def forward(self, x: mx.array) -> mx.array:
        """decode(encode(x)): the reconstruction of x (a transcoder's prediction of its target)."""
        f, state = self.encode_with_state(x)
        return self.decode(f, state)

    __call__ = forward

    def arrays(self) -> dict[str, mx.array]:
        """The weights by SAELens name (what sae_weights.safetensors holds)."""
        return dict(self.params)

    def numpy(self) -> dict[str, np.ndarray]:
        """The weights as float32 numpy arrays."""
        return {k: np.array(v.astype(mx.float32)) for k, v in self.params.items()}

    def with_config(self, **changes: Any) -> "SAE":
        """The same weights under a changed config (e.g. another hook name)."""
        return SAE(replace(self.cfg, **changes), self.params)

    def __repr__(self) -> str:
        c = self.cfg
        k = f", k={c.k}" if c.k else ""
        return f"SAE({c.file_architecture}, d_in={c.d_in}, d_sae={c.d_sae}{k}, hook={c.hook_name!r})"
