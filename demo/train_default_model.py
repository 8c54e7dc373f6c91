"""Train the small gpt-oss model that ships inside mlx-engine as its default model.

The engine needs a model it can load with no download: the demo, the tutorials and the
server's first run all use it, and researchers poke at its activations. A randomly
initialised model would do for plumbing, but its activations mean nothing, so this script
trains a real (if tiny) one: the gpt-oss architecture (top-k routed experts, attention
sinks, alternating sliding-window and full attention, YaRN RoPE with ``truncate: false``),
so every code path a real gpt-oss checkpoint takes through the engine is exercised, trained
with transformers + PyTorch on two CPU cores in about a quarter of an hour.

The text is the Python standard library's own source (PSF licence), read from the running
interpreter's stdlib directory, so nothing is downloaded. A slice of it is also rendered as
Harmony chat conversations (docstring -> function, function -> docstring), so the model has
seen its chat template and its special tokens and answers a chat request in the right shape.

Outputs (``--out``, default ``build/default-model-float``, which is git-ignored):
the float32 checkpoint in transformers' layout (safetensors), the tokenizer
(``tokenizer.json``, ``tokenizer_config.json``, ``chat_template.jinja``) and
``training_report.json``. ``--convert`` then writes the 4-bit MLX conversion that is committed
at ``mlx_engine/default_model/`` (at most 20 MB) with ``mlx_engine.convert``.

Usage::

    python demo/train_default_model.py                      # train, 15 minutes
    python demo/train_default_model.py --convert            # train, then convert
    python demo/train_default_model.py --convert-only       # convert an existing --out
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import math
import os
import platform
import random
import shutil
import sys
import sysconfig
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

# On a shared CPU, OpenMP threads that spin while waiting for a descheduled sibling burn the
# core that sibling needs; measured here, a contended two-thread step took 3.3 s spinning and
# 1.9 s with passive waiting. It must be set before torch (and its OpenMP runtime) loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / "build" / "default-model-float"
PACKAGED_DIR = REPO_ROOT / "mlx_engine" / "default_model"
PACKAGED_LIMIT_BYTES = 20 * 1024 * 1024
EXIT_CONVERTER_MISSING = 3
EXIT_PACKAGE_TOO_LARGE = 4

HARMONY_SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|start|>",
    "<|message|>",
    "<|channel|>",
    "<|end|>",
    "<|return|>",
    "<|constrain|>",
    "<|call|>",
]

DEFAULT_SYSTEM_MESSAGE = (
    "You are a small model trained on the Python standard library.\n"
    "# Valid channels: final. Channel must be included for every message."
)

# Harmony, the format gpt-oss is trained on: every message is
# <|start|>{role}<|message|>{content}<|end|>; the assistant names its channel, and a finished
# answer ends with <|return|> when generated (<|end|> when it is part of the history). Like
# gpt-oss's own template, a system message is always rendered (the default one unless the
# caller gives one), developer instructions get their own turn, and the generation prompt is
# `<|start|>assistant`, after which the model itself writes `<|channel|>final<|message|>`.
HARMONY_CHAT_TEMPLATE = (
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set system_message = messages[0]['content'] -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    "{%- set system_message = default_system_message | default('"
    + DEFAULT_SYSTEM_MESSAGE.replace("\n", "\\n")
    + "') -%}"
    "{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "<|start|>system<|message|>{{ system_message }}<|end|>"
    "{%- for message in loop_messages -%}"
    "{%- if message['role'] == 'developer' -%}"
    "<|start|>developer<|message|>{{ message['content'] }}<|end|>"
    "{%- elif message['role'] == 'user' -%}"
    "<|start|>user<|message|>{{ message['content'] }}<|end|>"
    "{%- elif message['role'] == 'assistant' -%}"
    "{%- if loop.last and not add_generation_prompt -%}"
    "<|start|>assistant<|channel|>final<|message|>{{ message['content'] }}<|return|>"
    "{%- else -%}"
    "<|start|>assistant<|channel|>final<|message|>{{ message['content'] }}<|end|>"
    "{%- endif -%}"
    "{%- elif message['role'] == 'system' -%}"
    "{{ raise_exception('Only the first message may be a system message.') }}"
    "{%- else -%}"
    "{{ raise_exception('Unsupported role: ' + message['role']) }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|start|>assistant{%- endif -%}"
)

# Real gpt-oss's RoPE: YaRN stretching a 4096-position original context 32-fold, without
# truncating the correction range, so the engine's YaRN path is exercised as it is for gpt-oss.
YARN_ROPE_PARAMETERS = {
    "rope_type": "yarn",
    "rope_theta": 150000.0,
    "factor": 32.0,
    "beta_fast": 32.0,
    "beta_slow": 1.0,
    "truncate": False,
    "original_max_position_embeddings": 4096,
}

# Prompts for the text samples in the report. They end where a token ends: a prompt with a
# trailing space ("def ") leaves a lone space token that byte-level BPE almost never produces
# before a word, so the model would be asked to continue from a state it has not seen.
SAMPLE_PROMPTS = ("def", "import")
CHAT_SAMPLE_REQUEST = "Write a Python function `is_even(n)`. Return True if *n* is even."

EXCLUDED_DIR_NAMES = {"test", "tests", "idle_test", "site-packages", "__pycache__"}


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


@dataclass
class SourceFile:
    """One stdlib module: its path relative to the stdlib directory and its text."""

    relpath: str
    text: str


def collect_stdlib_sources(stdlib_dir: Path) -> list[SourceFile]:
    """The stdlib's .py files, sorted by path so the corpus is the same on every run.

    Left out: test suites (huge, and mostly fixtures rather than library code), installed
    third-party packages (not PSF-licensed stdlib), the charmap codec tables generated by
    gencodec.py (pages of hex literals that teach nothing), and ``_sysconfigdata_*`` (this
    machine's build settings, which would make the corpus machine-dependent).
    """
    files: list[SourceFile] = []
    for path in sorted(stdlib_dir.rglob("*.py")):
        rel = path.relative_to(stdlib_dir)
        if any(part in EXCLUDED_DIR_NAMES for part in rel.parts[:-1]):
            continue
        if rel.name.startswith("_sysconfigdata"):
            continue
        if rel.parts[0].startswith("config-"):
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if "gencodec.py" in text[:400]:
            continue
        if not text.strip():
            continue
        files.append(SourceFile(rel.as_posix(), text))
    return files


def split_files(
    files: Sequence[SourceFile], val_fraction: float, seed: int
) -> tuple[list[SourceFile], list[SourceFile]]:
    """Hold out whole files, so held-out loss measures code the model has never seen
    (random windows from the same files would share identifiers and docstrings)."""
    rng = random.Random(seed)
    n_val = max(1, round(len(files) * val_fraction))
    val_idx = set(rng.sample(range(len(files)), n_val))
    train = [f for i, f in enumerate(files) if i not in val_idx]
    val = [f for i, f in enumerate(files) if i in val_idx]
    return train, val


def corpus_digest(files: Sequence[SourceFile]) -> str:
    """SHA-256 over paths and contents: identifies exactly which text a checkpoint saw."""
    h = hashlib.sha256()
    for f in files:
        h.update(f.relpath.encode())
        h.update(b"\0")
        h.update(f.text.encode())
        h.update(b"\0")
    return h.hexdigest()


@dataclass
class FunctionDoc:
    """A documented function: its signature, the first paragraph of its docstring, its code."""

    signature: str
    summary: str
    code: str


def documented_functions(source: SourceFile, max_code_chars: int) -> list[FunctionDoc]:
    """Functions and methods with a docstring, short enough for one training window."""
    try:
        tree = ast.parse(source.text)
    except SyntaxError:
        return []
    lines = source.text.splitlines(keepends=True)
    found: list[FunctionDoc] = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        doc = ast.get_docstring(node)
        if not doc or node.end_lineno is None:
            continue
        summary = doc.strip().split("\n\n")[0].strip()
        summary = " ".join(summary.split())
        if len(summary) < 12 or len(summary) > 300:
            continue
        code = textwrap.dedent("".join(lines[node.lineno - 1 : node.end_lineno])).rstrip()
        if len(code) > max_code_chars:
            continue
        try:
            args = ast.unparse(node.args)
        except Exception:
            continue
        found.append(FunctionDoc(signature=f"{node.name}({args})", summary=summary, code=code))
    return found


def chat_conversations(
    files: Sequence[SourceFile], max_code_chars: int, max_count: int, seed: int
) -> list[list[dict[str, str]]]:
    """Harmony conversations built from the training files' documented functions.

    Two directions, so the model learns both to answer a request with code and to answer a
    code question with prose; the phrasing varies so the user turn is not a fixed prefix.
    """
    rng = random.Random(seed)
    docs = [d for f in files for d in documented_functions(f, max_code_chars)]
    rng.shuffle(docs)
    write_forms = (
        "Write a Python function `{sig}`. {summary}",
        "{summary}\nImplement it as `{sig}` in Python.",
        "Implement `{sig}`: {summary}",
    )
    explain_forms = (
        "What does this function do?\n\n{code}",
        "Explain this code briefly.\n\n{code}",
        "Write a docstring summary for:\n\n{code}",
    )
    conversations: list[list[dict[str, str]]] = []
    for d in docs[:max_count]:
        if rng.random() < 0.6:
            user = rng.choice(write_forms).format(sig=d.signature, summary=d.summary)
            answer = d.code
        else:
            user = rng.choice(explain_forms).format(code=d.code)
            answer = d.summary
        conversations.append([{"role": "user", "content": user}, {"role": "assistant", "content": answer}])
    return conversations


def train_tokenizer(texts: Sequence[str], vocab_size: int) -> Any:
    """Byte-level BPE (like gpt-oss: any byte string round-trips) with Harmony's special
    tokens, trained on the training text only, wrapped as a PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=HARMONY_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=None,
        eos_token="<|return|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=[t for t in HARMONY_SPECIAL_TOKENS if t not in ("<|return|>", "<|endoftext|>")],
        model_max_length=131072,
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = HARMONY_CHAT_TEMPLATE
    return fast


def encode_documents(tokenizer: Any, documents: Sequence[str]) -> np.ndarray:
    """One token stream, documents separated by <|endoftext|> as in gpt-oss pretraining."""
    sep = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    # The backend tokenizer directly: whole files exceed model_max_length, which only
    # matters for a single forward pass, not for building a stream that is cut into windows.
    encoded = [e.ids for e in tokenizer.backend_tokenizer.encode_batch(list(documents), add_special_tokens=False)]
    total = sum(len(ids) + 1 for ids in encoded)
    stream = np.empty(total, dtype=np.int32)
    pos = 0
    for ids in encoded:
        stream[pos : pos + len(ids)] = ids
        pos += len(ids)
        stream[pos] = sep
        pos += 1
    return stream


@dataclass
class PreparedData:
    """Everything the training loop needs, plus what the report says about the corpus."""

    tokenizer: Any
    train_stream: np.ndarray
    val_stream: np.ndarray
    val_bytes: int
    description: dict[str, Any] = field(default_factory=dict)


def prepare_data(args: argparse.Namespace) -> PreparedData:
    stdlib_dir = Path(args.stdlib_dir or sysconfig.get_paths()["stdlib"]).resolve()
    files = collect_stdlib_sources(stdlib_dir)
    if len(files) < 20:
        raise SystemExit(f"only {len(files)} source files found under {stdlib_dir}; is this a full Python install?")
    train_files, val_files = split_files(files, args.val_fraction, args.seed)
    train_texts = [f.text for f in train_files]
    val_texts = [f.text for f in val_files]

    tokenizer = train_tokenizer(train_texts, args.vocab_size)

    train_chars = sum(len(t) for t in train_texts)
    chat_budget_chars = int(train_chars * args.chat_fraction)
    convs = chat_conversations(train_files, max_code_chars=args.seq_len * 3, max_count=10**9, seed=args.seed + 1)
    chat_docs: list[str] = []
    used = 0
    for conv in convs:
        if used >= chat_budget_chars:
            break
        rendered = tokenizer.apply_chat_template(conv, tokenize=False)
        chat_docs.append(rendered)
        used += len(rendered)

    docs = train_texts + chat_docs
    order = list(range(len(docs)))
    random.Random(args.seed + 2).shuffle(order)
    train_stream = encode_documents(tokenizer, [docs[i] for i in order])
    val_stream = encode_documents(tokenizer, val_texts)
    val_bytes = sum(len(t.encode("utf-8")) for t in val_texts)

    description = {
        "source": f"Python {platform.python_version()} standard library source (*.py files)",
        "licence": "Python Software Foundation License (PSF-2.0)",
        "stdlib_dir": str(stdlib_dir),
        "excluded": "test suites (test/, tests/, idle_test/), site-packages, gencodec charmap tables, _sysconfigdata_*",
        "files_total": len(files),
        "files_train": len(train_files),
        "files_held_out": len(val_files),
        "held_out_files": [f.relpath for f in val_files],
        "train_bytes": sum(len(t.encode("utf-8")) for t in train_texts),
        "held_out_bytes": val_bytes,
        "chat_conversations": len(chat_docs),
        "chat_fraction_of_train_chars": round(used / max(1, train_chars + used), 4),
        "train_tokens": int(train_stream.size),
        "held_out_tokens": int(val_stream.size),
        "corpus_sha256": corpus_digest(files),
    }
    return PreparedData(tokenizer, train_stream, val_stream, val_bytes, description)


def windows(stream: np.ndarray, length: int, offset: int = 0) -> np.ndarray:
    """Non-overlapping windows of ``length`` tokens (inputs and shifted targets together)."""
    usable = (stream.size - offset) // length
    return stream[offset : offset + usable * length].reshape(usable, length)


def training_batches(stream: np.ndarray, seq_len: int, batch_size: int, seed: int) -> Iterator[np.ndarray]:
    """Endless epochs; each starts at a new random offset and visits windows in a new
    random order, so consecutive epochs do not cut the text at the same places."""
    rng = np.random.default_rng(seed)
    while True:
        offset = int(rng.integers(0, seq_len))
        epoch = windows(stream, seq_len + 1, offset)
        perm = rng.permutation(len(epoch))
        for start in range(0, len(perm) - batch_size + 1, batch_size):
            yield epoch[perm[start : start + batch_size]]


# --------------------------------------------------------------------------------------------
# Model, evaluation, sampling
# --------------------------------------------------------------------------------------------


def build_model(args: argparse.Namespace, tokenizer: Any) -> Any:
    from transformers import GptOssConfig, GptOssForCausalLM

    layer_types = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(args.layers)]
    config = GptOssConfig(
        vocab_size=len(tokenizer),
        hidden_size=args.hidden,
        intermediate_size=args.expert_hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        head_dim=args.head_dim,
        num_local_experts=args.experts,
        num_experts_per_tok=args.top_k,
        sliding_window=args.sliding_window,
        layer_types=layer_types,
        max_position_embeddings=131072,
        rope_parameters=dict(YARN_ROPE_PARAMETERS),
        tie_word_embeddings=False,
        attention_bias=True,
        router_aux_loss_coef=args.router_aux_coef,
        output_router_logits=False,
        initializer_range=0.02,
        eos_token_id=tokenizer.convert_tokens_to_ids("<|return|>"),
        pad_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        bos_token_id=None,
    )
    model = GptOssForCausalLM(config)
    # Eager attention is the only exact CPU path with sinks (gpt-oss has no SDPA support);
    # grouped_mm computes the same experts as the eager per-expert loop, faster.
    model.set_attn_implementation("eager")
    model.set_experts_implementation(args.experts_implementation)
    stop_ids = [tokenizer.convert_tokens_to_ids(t) for t in ("<|return|>", "<|endoftext|>", "<|call|>")]
    model.generation_config.eos_token_id = stop_ids
    model.generation_config.pad_token_id = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    model.generation_config.bos_token_id = None
    return model


def parameter_groups(model: Any, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices only: biases, norm gains and attention sinks are offsets whose
    natural value is not zero, so pulling them towards zero only hurts."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.ndim < 2 or "norm" in name or name.endswith("sinks"):
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def learning_rate(step: int, progress: float, peak: float, warmup_steps: int, min_ratio: float) -> float:
    """Linear warmup, then cosine to ``min_ratio * peak`` over the run's progress in [0, 1]
    (progress is elapsed time over the budget, or steps over --max-steps)."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    progress = min(max(progress, 0.0), 1.0)
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def evaluate(model: Any, eval_windows: np.ndarray, batch_size: int, with_routing: bool = False) -> dict[str, Any]:
    """Mean next-token cross-entropy (nats) over the windows; optionally how often each
    expert of each layer is chosen, to show no expert is dead."""
    import torch

    model.eval()
    total_nll, total_tokens = 0.0, 0
    counts: list[np.ndarray] | None = None
    with torch.no_grad():
        for start in range(0, len(eval_windows), batch_size):
            batch = torch.from_numpy(eval_windows[start : start + batch_size].astype(np.int64))
            out = model(input_ids=batch[:, :-1], output_router_logits=with_routing)
            logits = out.logits.float()
            nll = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
            )
            total_nll += float(nll)
            total_tokens += batch[:, 1:].numel()
            if with_routing and out.router_logits is not None:
                k = model.config.num_experts_per_tok
                layer_counts = []
                for layer_logits in out.router_logits:
                    chosen = torch.topk(layer_logits, k, dim=-1).indices.reshape(-1)
                    layer_counts.append(np.bincount(chosen.numpy(), minlength=model.config.num_local_experts))
                stacked = np.stack(layer_counts)
                counts = stacked if counts is None else counts + stacked
    model.train()
    result: dict[str, Any] = {"loss": total_nll / max(1, total_tokens), "tokens": total_tokens}
    if counts is not None:
        result["expert_load"] = (counts / counts.sum(axis=1, keepdims=True)).round(4).tolist()
    return result


def unigram_cross_entropy(train_stream: np.ndarray, val_stream: np.ndarray, vocab_size: int) -> float:
    """Held-out cross-entropy of add-one-smoothed training token frequencies: the loss of a
    model that ignores context, so the gap to it is what the network learned about context."""
    counts = np.bincount(train_stream, minlength=vocab_size).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    return float(-logp[val_stream[1:]].mean())


def generate_samples(model: Any, tokenizer: Any, max_new_tokens: int, seed: int) -> dict[str, Any]:
    """Greedy and sampled continuations of code prompts, and one chat answer."""
    import torch

    model.eval()
    samples: dict[str, Any] = {"code": [], "chat": {}}

    def run(ids: list[int], sample: bool) -> list[int]:
        torch.manual_seed(seed)
        kwargs: dict[str, Any] = {"do_sample": sample, "max_new_tokens": max_new_tokens}
        if sample:
            kwargs.update(temperature=0.8, top_p=0.95, top_k=0)
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long), **kwargs)
        return out[0, len(ids) :].tolist()

    for prompt in SAMPLE_PROMPTS:
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        samples["code"].append(
            {
                "prompt": prompt,
                "greedy": prompt + tokenizer.decode(run(ids, False), skip_special_tokens=False),
                "sampled (temperature 0.8, top_p 0.95)": prompt
                + tokenizer.decode(run(ids, True), skip_special_tokens=False),
            }
        )
    messages = [{"role": "user", "content": CHAT_SAMPLE_REQUEST}]
    chat_prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    chat_ids = tokenizer(chat_prompt, add_special_tokens=False)["input_ids"]
    samples["chat"] = {
        "messages": messages,
        "prompt": chat_prompt,
        "greedy_completion": tokenizer.decode(run(chat_ids, False), skip_special_tokens=False),
    }
    model.train()
    return samples


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


class AdaptiveThreads:
    """Keeps torch on whichever thread count (1 .. ``max_threads``) is currently faster.

    On an idle machine two threads nearly halve a step; when other jobs share the cores,
    every parallel region waits for its slowest thread and one thread can be several times
    faster. Which case holds changes during a run, so every ``probe_every`` steps a few
    steps run at another count and the faster median wins. Probe steps are ordinary
    training steps, so nothing is wasted but the switch.
    """

    def __init__(self, max_threads: int, probe_every: int = 100, probe_steps: int = 4) -> None:
        import torch

        self.torch = torch
        self.max_threads = max(1, max_threads)
        self.current = self.max_threads
        self.probe_every = probe_every
        self.probe_steps = probe_steps
        self.recent: list[float] = []
        self.probe: list[float] = []
        self.probing: int | None = None
        self.steps_since_probe = 0
        self.switches = 0
        torch.set_num_threads(self.current)

    def _alternative(self) -> int:
        return 1 if self.current != 1 else self.max_threads

    def record(self, step_seconds: float) -> None:
        """Feed one step's duration; may change the thread count for the next step."""
        if self.max_threads == 1:
            return
        if self.probing is not None:
            self.probe.append(step_seconds)
            if len(self.probe) >= self.probe_steps:
                baseline = float(np.median(self.recent[-self.probe_steps :]))
                trial = float(np.median(self.probe))
                if trial < 0.9 * baseline:
                    self.current = self.probing
                    self.switches += 1
                    log(f"threads -> {self.current} (step {trial:.2f}s vs {baseline:.2f}s)")
                self.torch.set_num_threads(self.current)
                self.probing = None
                self.probe = []
                self.recent = []
                self.steps_since_probe = 0
            return
        self.recent.append(step_seconds)
        self.steps_since_probe += 1
        if self.steps_since_probe >= self.probe_every and len(self.recent) >= self.probe_steps:
            self.probing = self._alternative()
            self.torch.set_num_threads(self.probing)


def train(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from tqdm import tqdm

    wall_start = time.perf_counter()
    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)

    out_dir = Path(args.out).resolve()
    log(f"collecting stdlib sources and training the tokenizer (vocab {args.vocab_size})")
    data = prepare_data(args)
    tokenizer = data.tokenizer
    prep_seconds = time.perf_counter() - wall_start
    val_bytes_per_token = data.val_bytes / max(1, data.val_stream.size)
    log(
        f"data ready in {prep_seconds:.0f}s: {data.description['files_train']} train files "
        f"({data.train_stream.size:,} tokens, {data.description['chat_conversations']} chat conversations), "
        f"{data.description['files_held_out']} held-out files ({data.val_stream.size:,} tokens, "
        f"{val_bytes_per_token:.2f} bytes/token)"
    )

    model = build_model(args, tokenizer)
    n_params = sum(p.numel() for p in model.parameters())
    per_expert = model.model.layers[0].mlp.experts.gate_up_proj[0].numel() + model.model.layers[0].mlp.experts.down_proj[0].numel()
    n_active = n_params - args.layers * (args.experts - args.top_k) * per_expert
    log(f"model: {n_params:,} parameters ({n_active:,} active per token)")

    optimizer = torch.optim.AdamW(
        parameter_groups(model, args.weight_decay), lr=args.lr, betas=(0.9, 0.95), eps=1e-8, fused=False
    )
    val_windows_all = windows(data.val_stream, args.seq_len + 1)
    pick = np.linspace(0, len(val_windows_all) - 1, num=min(args.eval_windows, len(val_windows_all))).astype(int)
    val_windows_quick = val_windows_all[np.unique(pick)]

    batches = training_batches(data.train_stream, args.seq_len, args.batch_size, args.seed)
    budget_s = args.time_budget_min * 60.0
    history: list[dict[str, Any]] = []
    tokens_seen = 0
    step = 0
    ema_loss: float | None = None
    ema_aux: float | None = None
    model.train()
    train_start = time.perf_counter()
    last_eval = train_start
    last_log = train_start
    threads = AdaptiveThreads(args.threads) if args.adaptive_threads else None
    bar = tqdm(total=int(budget_s), unit="s", desc="training", disable=None, dynamic_ncols=True)

    def progress() -> float:
        if args.max_steps:
            return step / args.max_steps
        return (time.perf_counter() - train_start) / budget_s

    while True:
        elapsed = time.perf_counter() - train_start
        if elapsed >= budget_s or (args.max_steps and step >= args.max_steps):
            break
        step_start = time.perf_counter()
        lr = learning_rate(step, progress(), args.lr, args.warmup_steps, args.min_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = torch.from_numpy(next(batches).astype(np.int64))
        inputs, targets = batch[:, :-1], batch[:, 1:]
        out = model(input_ids=inputs, output_router_logits=args.router_aux_coef > 0)
        logits = out.logits
        ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        loss = ce
        if args.router_aux_coef > 0 and out.aux_loss is not None:
            loss = ce + args.router_aux_coef * out.aux_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        optimizer.step()
        if threads is not None and step > 0:
            threads.record(time.perf_counter() - step_start)

        step += 1
        tokens_seen += inputs.numel()
        ce_value = ce.item()
        if not math.isfinite(ce_value):
            raise SystemExit(f"training diverged at step {step} (loss {ce_value}); lower --lr")
        ema_loss = ce_value if ema_loss is None else 0.95 * ema_loss + 0.05 * ce_value
        if out.aux_loss is not None:
            aux = out.aux_loss.item()
            ema_aux = aux if ema_aux is None else 0.95 * ema_aux + 0.05 * aux
        now = time.perf_counter()
        bar.n = min(int(now - train_start), int(budget_s))
        bar.set_postfix(step=step, loss=f"{ema_loss:.3f}", lr=f"{lr:.1e}", tok_s=f"{tokens_seen / (now - train_start):.0f}")
        if now - last_log >= args.log_every_s:
            last_log = now
            log(
                f"step {step:5d}  {now - train_start:6.0f}s  train loss {ema_loss:.3f}  "
                f"router aux {ema_aux if ema_aux is not None else float('nan'):.3f}  lr {lr:.2e}  "
                f"{tokens_seen / (now - train_start):.0f} tok/s"
            )
        if now - last_eval >= args.eval_every_s:
            last_eval = now
            ev = evaluate(model, val_windows_quick, args.batch_size)
            history.append(
                {
                    "step": step,
                    "seconds": round(now - train_start, 1),
                    "tokens_seen": tokens_seen,
                    "train_loss_ema": round(ema_loss, 4),
                    "held_out_loss_subset": round(ev["loss"], 4),
                    "lr": lr,
                }
            )
            log(f"step {step:5d}  held-out loss (subset) {ev['loss']:.3f}  train loss {ema_loss:.3f}")
    bar.close()
    train_seconds = time.perf_counter() - train_start
    log(f"trained {step} steps, {tokens_seen:,} tokens in {train_seconds:.0f}s; final evaluation on all held-out text")

    final = evaluate(model, val_windows_all, args.batch_size, with_routing=True)
    vocab = len(tokenizer)
    uniform = math.log(vocab)
    unigram = unigram_cross_entropy(data.train_stream, data.val_stream, vocab)
    held_out = final["loss"]
    log(
        f"held-out loss {held_out:.3f} nats/token (perplexity {math.exp(held_out):.1f}); "
        f"uniform {uniform:.3f}, unigram {unigram:.3f}; "
        f"{held_out / math.log(2) / val_bytes_per_token:.3f} bits/byte"
    )
    samples = generate_samples(model, tokenizer, args.sample_tokens, args.seed)
    for s in samples["code"]:
        log(f"greedy  {s['prompt']!r}: {s['greedy']!r}")
        log(f"sampled {s['prompt']!r}: {s['sampled (temperature 0.8, top_p 0.95)']!r}")
    log(f"chat    {samples['chat']['greedy_completion']!r}")

    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)

    report = {
        "model": {
            "architecture": "GptOssForCausalLM",
            "parameters": n_params,
            "active_parameters_per_token": n_active,
            "hidden_size": args.hidden,
            "layers": args.layers,
            "layer_types": model.config.layer_types,
            "attention_heads": args.heads,
            "kv_heads": args.kv_heads,
            "head_dim": args.head_dim,
            "experts": args.experts,
            "experts_per_token": args.top_k,
            "expert_intermediate_size": args.expert_hidden,
            "sliding_window": args.sliding_window,
            "rope_parameters": YARN_ROPE_PARAMETERS,
            "vocab_size": vocab,
            "trained_context_length": args.seq_len,
        },
        "training": {
            "framework": f"transformers + torch {torch.__version__} on CPU, float32",
            "threads": args.threads,
            "adaptive_threads": args.adaptive_threads,
            "thread_switches": threads.switches if threads is not None else 0,
            "seed": args.seed,
            "optimizer": "AdamW (betas 0.9, 0.95)",
            "peak_lr": args.lr,
            "min_lr_ratio": args.min_lr_ratio,
            "warmup_steps": args.warmup_steps,
            "schedule": "linear warmup then cosine over " + ("steps" if args.max_steps else "the time budget"),
            "weight_decay": args.weight_decay,
            "grad_clip": args.grad_clip,
            "router_aux_loss_coef": args.router_aux_coef,
            "batch_size": args.batch_size,
            "sequence_length": args.seq_len,
            "steps": step,
            "tokens_seen": tokens_seen,
            "epochs_over_train_tokens": round(tokens_seen / max(1, data.train_stream.size), 3),
            "time_budget_seconds": budget_s,
            "train_seconds": round(train_seconds, 1),
            "data_prep_seconds": round(prep_seconds, 1),
            "wall_seconds": round(time.perf_counter() - wall_start, 1),
            "tokens_per_second": round(tokens_seen / train_seconds, 1),
            "final_train_loss_ema": round(ema_loss, 4) if ema_loss is not None else None,
            "history": history,
        },
        "evaluation": {
            "held_out_cross_entropy_nats_per_token": round(held_out, 4),
            "held_out_perplexity": round(math.exp(held_out), 2),
            "held_out_bits_per_byte": round(held_out / math.log(2) / val_bytes_per_token, 4),
            "held_out_tokens_scored": final["tokens"],
            "uniform_baseline_nats_per_token": round(uniform, 4),
            "unigram_baseline_nats_per_token": round(unigram, 4),
            "held_out_bytes_per_token": round(val_bytes_per_token, 3),
            "expert_load_per_layer": final.get("expert_load"),
        },
        "data": data.description,
        "samples": samples,
        "environment": {
            "python": platform.python_version(),
            "platform": platform.platform(),
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        },
    }
    report["training"]["wall_seconds"] = round(time.perf_counter() - wall_start, 1)
    (out_dir / "training_report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    log(f"wrote {out_dir} (total wall time {report['training']['wall_seconds']:.0f}s)")
    return report


# --------------------------------------------------------------------------------------------
# Conversion to the packaged 4-bit MLX model
# --------------------------------------------------------------------------------------------


def directory_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def convert_to_package(float_dir: Path, packaged_dir: Path, bits: int, group_size: int) -> int:
    """Write the 4-bit MLX conversion of ``float_dir`` to ``packaged_dir``; returns an exit code.

    The conversion goes to a scratch folder first and replaces the packaged model only when
    it succeeded and fits the size limit, so a failed run never leaves a half-written package.
    """
    try:
        from mlx_engine.convert import quantize_checkpoint
    except ImportError as exc:
        log(
            "cannot convert: mlx_engine.convert.quantize_checkpoint is not importable "
            f"({exc}). The float checkpoint in {float_dir} is complete; rerun with --convert-only "
            "once the converter exists."
        )
        return EXIT_CONVERTER_MISSING
    if not (float_dir / "config.json").is_file():
        log(f"cannot convert: {float_dir} holds no checkpoint (config.json missing); train first")
        return 2
    scratch = float_dir.parent / (float_dir.name + f"-mlx-{bits}bit")
    if scratch.exists():
        shutil.rmtree(scratch)
    log(f"converting {float_dir} to {bits}-bit MLX (group size {group_size})")
    quantize_checkpoint(float_dir, scratch, bits=bits, group_size=group_size)
    report = float_dir / "training_report.json"
    if report.is_file():
        shutil.copy2(report, scratch / "training_report.json")
    size = directory_size(scratch)
    if size > PACKAGED_LIMIT_BYTES:
        log(f"conversion is {size / 2**20:.1f} MiB, over the {PACKAGED_LIMIT_BYTES / 2**20:.0f} MiB limit; not packaged")
        return EXIT_PACKAGE_TOO_LARGE
    if packaged_dir.exists():
        shutil.rmtree(packaged_dir)
    packaged_dir.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(scratch), str(packaged_dir))
    log(f"packaged {packaged_dir} ({size / 2**20:.2f} MiB)")
    return 0


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def log(message: str) -> None:
    """Timestamped line on stdout, flushed so a backgrounded run's log can be followed."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default=str(DEFAULT_OUT), help="float checkpoint folder (keep it outside mlx_engine/)")
    p.add_argument("--time-budget-min", type=float, default=15.0, help="wall-clock minutes for the training loop")
    p.add_argument("--max-steps", type=int, default=0, help="stop after this many steps and schedule by steps (0: by time)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (the most used)")
    p.add_argument(
        "--no-adaptive-threads",
        dest="adaptive_threads",
        action="store_false",
        help="always use --threads instead of dropping to one thread while that is faster",
    )
    p.add_argument("--stdlib-dir", default=None, help="stdlib folder (default: this interpreter's)")
    p.add_argument("--val-fraction", type=float, default=0.03, help="fraction of files held out")
    p.add_argument("--chat-fraction", type=float, default=0.1, help="share of training text rendered as Harmony chats")
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--expert-hidden", type=int, default=256, help="each expert's intermediate size")
    p.add_argument("--sliding-window", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--min-lr-ratio", type=float, default=0.1)
    p.add_argument("--warmup-steps", type=int, default=60)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--router-aux-coef", type=float, default=0.05, help="load-balancing loss weight (keeps every expert in use)")
    p.add_argument("--experts-implementation", default="grouped_mm", choices=["eager", "grouped_mm"])
    p.add_argument("--eval-every-s", type=float, default=120.0)
    p.add_argument("--eval-windows", type=int, default=32, help="held-out windows scored at each periodic evaluation")
    p.add_argument("--log-every-s", type=float, default=30.0)
    p.add_argument("--sample-tokens", type=int, default=96)
    p.add_argument("--convert", action="store_true", help="after training, write the 4-bit MLX package")
    p.add_argument("--convert-only", action="store_true", help="only convert the checkpoint already in --out")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=32)
    args = p.parse_args(argv)

    out = Path(args.out).resolve()
    if out == PACKAGED_DIR.parent or PACKAGED_DIR.parent in out.parents:
        p.error("--out must not be inside mlx_engine/: only the 4-bit conversion is packaged")
    if args.heads % args.kv_heads:
        p.error("--heads must be a multiple of --kv-heads")
    if args.top_k > args.experts:
        p.error("--top-k cannot exceed --experts")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.convert_only:
        train(args)
    if args.convert or args.convert_only:
        return convert_to_package(Path(args.out).resolve(), PACKAGED_DIR, args.bits, args.group_size)
    return 0


if __name__ == "__main__":
    sys.exit(main())
