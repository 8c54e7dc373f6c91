"""Chat templates written into the checkpoints this project makes itself.

One definition each, so the default model's trainer and the test checkpoints render a
conversation the same way, and a fix to a template reaches every checkpoint. The module is
plain strings on purpose: it imports nothing (no MLX, no transformers), so anything may use
it, including tools that run where MLX is not installed.
"""

from __future__ import annotations

__all__ = ["DEFAULT_SYSTEM_MESSAGE", "HARMONY_CHAT_TEMPLATE", "PLAIN_CHAT_TEMPLATE"]

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

# A template with no model family's conventions: each turn is <|{role}|>{content}<|eos|>, for
# test checkpoints that must not be mistaken for Harmony (or any real format).
PLAIN_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|eos|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
