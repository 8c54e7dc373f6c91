"""A tokenizer for a synthetic checkpoint: byte-level BPE sized to the model's vocabulary.

A random-weight model still needs a tokenizer to be loaded, prompted and decoded, and
the loader and chat code treat a model by its special tokens (Harmony for gpt-oss). So
the special tokens sit at the ids the real tokenizer gives them, the chat template has
the model family's shape, and every one of the `vocab_size` ids decodes to something,
whichever id a random model emits.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional
from ..chat_templates import HARMONY_CHAT_TEMPLATE

TRAINED_VOCAB = 2048
"""How many tokens are learned from real text; the rest of the vocabulary is filler."""

# Harmony checkpoints carry the one Harmony template of the project (tools/chat_templates.py).
HARMONY_TEMPLATE = HARMONY_CHAT_TEMPLATE
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
LLAMA2_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
    "{% else %}{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
)


@dataclass(frozen=True)
class TokenizerSpec:
    """Special tokens at the ids the real tokenizer gives them, and what they are for."""

    specials: dict[int, str]
    bos: Optional[str]
    eos: str
    pad: Optional[str]
    chat_template: str
    generation_eos: tuple[int, ...]


def tokenizer_spec(config: dict[str, Any]) -> TokenizerSpec:
    """The special tokens of the config's model family: gpt-oss (o200k_harmony), Llama 3
    (a vocabulary above 128000) or else Llama 2's three.

    Every id from the first special one to the end of the vocabulary is special, named
    where the real tokenizer names it and reserved otherwise, as in the real files.
    """
    vocab = config["vocab_size"]
    if config["model_type"] == "gpt_oss":
        named = {
            199998: "<|startoftext|>",
            199999: "<|endoftext|>",
            200002: "<|return|>",
            200003: "<|constrain|>",
            200005: "<|channel|>",
            200006: "<|start|>",
            200007: "<|end|>",
            200008: "<|message|>",
            200012: "<|call|>",
        }
        first = min(named)
        specials = {i: named.get(i, f"<|reserved_{i}|>") for i in range(first, vocab)}
        return TokenizerSpec(specials, "<|startoftext|>", "<|return|>", "<|endoftext|>", HARMONY_TEMPLATE, (200002, 199999, 200012))
    if vocab > 128000:
        named = {128000: "<|begin_of_text|>", 128001: "<|end_of_text|>", 128006: "<|start_header_id|>",
                 128007: "<|end_header_id|>", 128008: "<|eom_id|>", 128009: "<|eot_id|>"}
        specials = {i: named.get(i, f"<|reserved_special_token_{i - 128000}|>") for i in range(128000, vocab)}
        return TokenizerSpec(specials, "<|begin_of_text|>", "<|end_of_text|>", None, LLAMA3_TEMPLATE, (128001, 128008, 128009))
    specials = {0: "<unk>", 1: "<s>", 2: "</s>"}
    return TokenizerSpec(specials, "<s>", "</s>", None, LLAMA2_TEMPLATE, (2,))


def _training_text() -> str:
    """Deterministic English-and-code text to learn a few thousand merges from.

    The source of standard-library modules: always present, the same for a given
    Python, and no download.
    """
    import argparse
    import inspect
    import json.decoder
    import json.encoder

    return "\n".join(inspect.getsource(m) for m in (json, json.decoder, json.encoder, argparse))


def _combinations(alphabet: list[str], length: int) -> Iterator[str]:
    """Every string of `length` symbols from `alphabet`, in lexicographic order."""
    if length == 1:
        yield from alphabet
        return
    for head in alphabet:
        for tail in _combinations(alphabet, length - 1):
            yield head + tail


def _filler_tokens(trained: list[str], alphabet: list[str], count: int) -> list[str]:
    """`trained` extended to `count` distinct tokens with the shortest unused byte strings,
    so the ids past the learned ones still decode (they are never produced by merges)."""
    tokens = list(trained)
    taken = set(tokens)
    length = 2
    while len(tokens) < count:
        for combo in _combinations(alphabet, length):
            if combo not in taken:
                tokens.append(combo)
                taken.add(combo)
                if len(tokens) == count:
                    break
        length += 1
    return tokens


def write_tokenizer(out_dir: Path, config: dict[str, Any], model_max_length: int = 131072) -> int:
    """A byte-level BPE with exactly `vocab_size` ids; returns how many ids it names.

    A few thousand merges are learned from text so prompts tokenize like prose; every
    remaining id gets a distinct byte string (reachable by id, never by merges), so any
    id a random model emits decodes. Writes tokenizer.json, tokenizer_config.json (with
    the chat template) and generation_config.json (the ids that end a generation).
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    spec = tokenizer_spec(config)
    vocab_size = config["vocab_size"]
    regular_ids = [i for i in range(vocab_size) if i not in spec.specials]

    trainer_tok = Tokenizer(models.BPE())
    trainer_tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=min(TRAINED_VOCAB, len(regular_ids)),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    trainer_tok.train_from_iterator([_training_text()], trainer=trainer)
    learned = json.loads(trainer_tok.to_str())["model"]
    trained = sorted(learned["vocab"].items(), key=lambda kv: kv[1])
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in learned["merges"]]

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens = _filler_tokens([t for t, _ in trained], alphabet, len(regular_ids))
    vocab = {tok: i for tok, i in zip(tokens, regular_ids)}
    vocab.update({text: i for i, text in spec.specials.items()})

    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for _, t in sorted(spec.specials.items())])
    tok.save(str(out_dir / "tokenizer.json"))

    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": spec.bos,
        "eos_token": spec.eos,
        "pad_token": spec.pad,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
        "chat_template": spec.chat_template,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    generation = {"eos_token_id": list(spec.generation_eos), "do_sample": False}
    if spec.bos is not None:
        generation["bos_token_id"] = next(i for i, t in spec.specials.items() if t == spec.bos)
    (out_dir / "generation_config.json").write_text(json.dumps(generation, indent=2))
    return len(vocab)
