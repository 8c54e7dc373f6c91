"""Steer a model toward a class of tokens with a difference-of-means vector.

    python examples/steering.py [MODEL] [--class newlines|digits] [--layer N] [--scale S] [--tokens N] [--seed N]

The vector is mean(residual | prompts rich in the class) - mean(residual | prompts poor
in it) at one layer (mlx_engine.steering_vector). It is then added (times --scale) to
that layer's residual stream at every position while the model samples --tokens tokens
per neutral prompt with a fixed seed, and the share of sampled tokens in the class is
compared with the same sampling unsteered. Sampling uses the same seeds in both runs,
so the difference comes from the steering alone.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import mlx_engine


@dataclass(frozen=True)
class TokenClass:
    name: str
    member: Callable[[str], bool]  # on one token's decoded text
    rich: tuple[str, ...]
    poor: tuple[str, ...]


TOKEN_CLASSES = {
    "digits": TokenClass(
        "digits",
        lambda text: any(ch.isdigit() for ch in text),
        (
            "x = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]",
            "port = 8080\ntimeout = 30\nretries = 5\nsize = 1024",
            "0x1F, 0x2E, 255, 4096, 65535, 12, 48, 96",
            "assert add(2, 3) == 5\nassert add(10, 20) == 30\nassert add(7, 8) == 15",
            "RGB = (128, 64, 255)\nVERSION = (3, 11, 4)\nLIMIT = 1000000",
        ),
        (
            "def name(self):\n    return self._name",
            "import os\nimport sys\nfrom pathlib import Path",
            "class Reader(object):\n    pass",
            "if not path.exists():\n    raise FileNotFoundError(path)",
            "for item in items:\n    yield item.value",
        ),
    ),
    "newlines": TokenClass(
        "newlines",
        lambda text: "\n" in text,
        (
            "a = 1\nb = 2\n\nc = 3\n\n\nd = 4\n",
            "import os\n\n\nimport sys\n\n\n",
            "pass\n\npass\n\npass\n\n",
            "x\ny\nz\nw\nv\n",
        ),
        (
            "result = compute(alpha, beta, gamma, delta, epsilon, zeta, eta, theta)",
            "names = ['alpha', 'beta', 'gamma', 'delta', 'epsilon', 'zeta']",
            "value = first_value + second_value * third_value - fourth_value",
            "return self.left.evaluate(context) and self.right.evaluate(context)",
        ),
    ),
}

NEUTRAL_PROMPTS = (
    "def process(data):\n    ",
    "class Config:\n    ",
    "result = ",
    "# Read the file and ",
)


@dataclass
class SteeringReport:
    token_class: str
    layer: str
    scale: float
    vector_norm: float
    tokens_per_run: int
    plain_frequency: float
    steered_frequency: float
    plain_sample: str
    steered_sample: str


def class_frequency(kit: mlx_engine.ModelKit, token_ids: Sequence[int], member: Callable[[str], bool]) -> float:
    """Share of tokens whose own decoded text is in the class."""
    if not token_ids:
        return 0.0
    return sum(member(kit.tokenizer.decode([t])) for t in token_ids) / len(token_ids)


def sample(kit: mlx_engine.ModelKit, n_tokens: int, seed: int, interventions: Sequence[dict]) -> tuple[list[int], str]:
    """n_tokens sampled tokens after each neutral prompt (fixed seeds; no stop at EOS text)."""
    tokens: list[int] = []
    first_text = ""
    for k, prompt in enumerate(NEUTRAL_PROMPTS):
        ids = mlx_engine.tokenize(kit, prompt)
        results = list(
            mlx_engine.create_generator(kit, ids, max_tokens=n_tokens, temp=1.0, seed=seed + k, interventions=interventions)
        )
        tokens += [r.token for r in results]
        if k == 0:
            first_text = prompt + "".join(r.text for r in results)
    return tokens, first_text


def run(
    kit: mlx_engine.ModelKit,
    token_class: str = "newlines",
    layer: Optional[int] = None,
    scale: float = 4.0,
    n_tokens: int = 48,
    seed: int = 0,
) -> SteeringReport:
    """Build the class's steering vector and measure the class frequency with and without it."""
    cls = TOKEN_CLASSES[token_class]
    layer = kit.arch_info.num_layers // 2 if layer is None else layer
    vector = mlx_engine.steering_vector(kit, list(cls.rich), list(cls.poor), layer)
    plain, plain_text = sample(kit, n_tokens, seed, [])
    steered, steered_text = sample(kit, n_tokens, seed, [vector.intervention(scale=scale)])
    return SteeringReport(
        token_class=cls.name,
        layer=vector.layer_name,
        scale=scale,
        vector_norm=vector.norm,
        tokens_per_run=len(plain),
        plain_frequency=class_frequency(kit, plain, cls.member),
        steered_frequency=class_frequency(kit, steered, cls.member),
        plain_sample=plain_text,
        steered_sample=steered_text,
    )


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default="default", help="model folder or Hub id (default: the embedded model)")
    parser.add_argument("--class", dest="token_class", choices=sorted(TOKEN_CLASSES), default="newlines")
    parser.add_argument("--layer", type=int, default=None, help="layer to steer (default: the middle one)")
    parser.add_argument("--scale", type=float, default=4.0, help="multiplier on the difference of means")
    parser.add_argument("--tokens", type=int, default=48, help="tokens sampled per neutral prompt")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    kit = mlx_engine.load_model(args.model)
    report = run(kit, args.token_class, args.layer, args.scale, args.tokens, args.seed)
    print(f"steering toward {report.token_class} at {report.layer} (|v| = {report.vector_norm:.2f}, scale {report.scale})")
    print(f"--- unsteered sample ---\n{report.plain_sample}")
    print(f"--- steered sample ---\n{report.steered_sample}")
    print(
        f"{report.token_class} frequency over {report.tokens_per_run} sampled tokens: "
        f"{report.plain_frequency:.3f} unsteered, {report.steered_frequency:.3f} steered"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
