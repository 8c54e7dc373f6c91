"""One rank of a serving job: rank 0 leads generations (distributed/serve.py), the others follow.

    python tests/distributed_serve_rank.py CHECKPOINT OUT_DIR tensor|pipeline serve|killed

`serve`: rank 0 runs a fixed sequence of calls through a Leader (every hook, a client that
leaves after 3 steps, a prefill stopped by should_stop, an edit, sampling without a seed),
then shuts down; the others run `follow` and record the tokens of each call they ran.
`killed`: rank 0 starts a long generation, writes OUT_DIR/started after two steps, waits for
OUT_DIR/killed (the test kills rank 1 in between) and records how the next step fails.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from distributed_rank import PROMPT, all_hooks, interventions, record_steps

STEPS = 8


def lead(kit: Any, leader: Any, out: dict[str, Any]) -> None:
    import mlx_engine
    from mlx_engine.generation.loop import GenerationCancelled

    tokens = mlx_engine.tokenize(kit, PROMPT)
    gen: dict[str, Any] = {"max_tokens": STEPS, "temp": 0.0, "top_logprobs": 5}
    record_steps(out, "all_hooks", leader.generate(kit, tokens, all_hooks(kit), **gen))
    steps = leader.generate(kit, tokens, ["layers.1.residual"], **gen)
    out["left/tokens"] = np.array([next(steps)[0].token for _ in range(3)])
    steps.close()  # the client went away after 3 tokens
    try:
        next(leader.generate(kit, tokens, (), should_stop=lambda: True, **gen))
        out["cancelled"] = np.array(False)
    except GenerationCancelled:
        out["cancelled"] = np.array(True)
    edits = interventions(kit, len(tokens))["residual_steer"]
    record_steps(out, "edit/residual_steer", leader.generate(kit, tokens, ["layers.1.z"], interventions=edits, **gen))
    sampled = leader.generate(kit, tokens, (), max_tokens=STEPS, temp=1.0)
    out["sampled/tokens"] = np.array([r.token for r, _ in sampled])
    leader.shutdown()


def killed(kit: Any, leader: Any, out_dir: Path, out: dict[str, Any]) -> None:
    import mlx_engine
    from mlx_engine.distributed.serve import RankLostError

    steps = leader.generate(kit, mlx_engine.tokenize(kit, PROMPT), (), max_tokens=10_000, temp=0.0)
    next(steps), next(steps)
    (out_dir / "started").write_text("2")
    for _ in range(600):
        if (out_dir / "killed").exists():
            break
        time.sleep(0.1)
    t0 = time.monotonic()
    try:
        for _ in steps:
            pass
        out["error"] = np.array("")
    except RankLostError as exc:
        out["error"] = np.array(str(exc))
    out["seconds_to_error"] = np.array(time.monotonic() - t0)
    try:
        leader.generate(kit, [1, 2, 3], (), max_tokens=2)
        out["refused_after"] = np.array("")
    except RankLostError as exc:
        out["refused_after"] = np.array(str(exc))


def main(argv: list[str]) -> int:
    checkpoint, out_dir, parallel, mode = Path(argv[1]), Path(argv[2]), argv[3], argv[4]
    import mlx_engine  # before MLX: it binds MLX's CPU backend to OpenBLAS first

    import mlx.core as mx
    from mlx_engine.distributed.serve import Leader, follow

    group = mx.distributed.init(backend="ring", strict=True)
    kit = mlx_engine.load_model(checkpoint, parallel=parallel)
    out: dict[str, Any] = {}
    if group.rank() == 0:
        leader = Leader(group)
        lead(kit, leader, out) if mode == "serve" else killed(kit, leader, out_dir, out)
    else:
        seen: dict[int, list[int]] = {}
        out["followed"] = np.array(follow(kit, group, on_step=lambda call, item: seen.setdefault(call, []).append(item[0].token)))
        for call, tokens in seen.items():
            out[f"call{call}/tokens"] = np.array(tokens)
    np.savez(out_dir / f"rank{group.rank()}.npz", **out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
