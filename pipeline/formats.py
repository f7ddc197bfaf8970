"""Preference record formats, detected per source and normalised into one `Pair`.

Formats (``--format``):

- ``text``: ``prompt``, ``chosen``, ``rejected`` as strings.
- ``chat``: ``chosen`` and ``rejected`` as message lists (``[{"role", "content"}]``) that share their
  prompt turns and differ in the last assistant turn (Tulu, UltraFeedback-binarized; a string
  ``prompt`` column beside them is ignored, as it repeats the first user turn).
- ``chat-prompt``: ``prompt`` as a message list, ``chosen``/``rejected`` as strings or message lists.
- ``hh``: Anthropic HH-RLHF dialogues (``\\n\\nHuman:`` / ``\\n\\nAssistant:``) in ``chosen`` and
  ``rejected``, split at the last assistant turn into the prompt and the two responses.
- ``sharegpt``: ``conversations`` with ``from``/``value`` turns, ``chosen``/``rejected`` turns,
  optional ``system`` (LLaMA-Factory's layout).

Any other column names map onto these with ``--columns prompt=question,chosen=good,rejected=bad``.

A malformed record raises `FieldError` (the stage adds file and line). A well-formed record that
cannot make a training pair (empty text, identical responses, HH dialogues whose prompts differ)
comes back as a `Drop` with a reason that is counted in the manifest.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from ..artifacts.errors import UsageError

FORMATS = ("auto", "text", "chat", "chat-prompt", "hh", "sharegpt")
CHAT_FORMATS = ("chat", "chat-prompt", "sharegpt")
COLUMN_TARGETS = ("prompt", "chosen", "rejected", "conversations", "system")
HH_ASSISTANT = "\n\nAssistant:"
SHAREGPT_ROLES = {
    "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "model": "assistant",
    "system": "system", "function_call": "tool_call", "observation": "tool", "tool": "tool",
}

# Roles the chat templates of the ecosystem know (OpenAI's, Llama 3's ipython, legacy function).
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool", "function", "ipython")
# A lone UTF-16 surrogate: from a JSON "\\ud800" escape without its pair, or a byte that is not UTF-8
# (sources.py carries those as surrogates); the Rust tokenizers cannot take either.
_SURROGATE = re.compile("[\ud800-\udfff]")

Message = dict[str, str]


@dataclasses.dataclass(frozen=True)
class Pair:
    """A normalised preference pair: a text prompt (plain) or a message list (chat), two responses."""

    prompt: str | tuple[Message, ...]
    chosen: str
    rejected: str

    @property
    def is_chat(self) -> bool:
        return not isinstance(self.prompt, str)


@dataclasses.dataclass(frozen=True)
class Drop:
    reason: str
    detail: str = ""


class FieldError(Exception):
    """A missing or wrongly typed field; ``field`` is its path, e.g. ``chosen[2].content``."""

    def __init__(self, field: str, message: str):
        super().__init__(f"field {field!r}: {message}")
        self.field = field


def parse_columns(text: str | None) -> dict[str, str]:
    """``prompt=question,chosen=good`` -> {"prompt": "question", "chosen": "good"}."""
    if not text:
        return {}
    mapping: dict[str, str] = {}
    for item in text.split(","):
        target, sep, column = (part.strip() for part in item.partition("="))
        if not sep or not target or not column:
            raise UsageError(f"--columns {text!r}: expected TARGET=COLUMN pairs separated by commas, got {item!r}")
        if target not in COLUMN_TARGETS:
            raise UsageError(f"--columns: unknown target {target!r}; targets: {', '.join(COLUMN_TARGETS)}")
        mapping[target] = column
    return mapping


def apply_columns(record: dict[str, Any], columns: dict[str, str]) -> dict[str, Any]:
    if not columns:
        return record
    mapped = {k: v for k, v in record.items() if k not in columns.values()}
    for target, column in columns.items():
        if column not in record:
            raise FieldError(column, f"missing (mapped to {target!r} by --columns)")
        mapped[target] = record[column]
    return mapped


def detect_format(record: dict[str, Any]) -> str:
    """The format of a source, judged from its first record's fields."""
    fields = set(record)
    if "conversations" in fields:
        return "sharegpt"
    if {"chosen", "rejected"} <= fields:
        chosen, rejected = record["chosen"], record["rejected"]
        if isinstance(record.get("prompt"), list):
            return "chat-prompt"
        if isinstance(chosen, list) and isinstance(rejected, list):
            return "chat"
        if "prompt" in fields:
            return "text"
        if isinstance(chosen, str) and HH_ASSISTANT in chosen:
            return "hh"
    raise UsageError(
        f"cannot tell the record format from the fields {sorted(fields)}; pass --format "
        f"({', '.join(FORMATS[1:])}) or map the columns with --columns prompt=...,chosen=...,rejected=..."
    )


def normalise(record: dict[str, Any], fmt: str) -> Pair | Drop:
    """One record of format ``fmt`` as a Pair, or a Drop; FieldError if it is malformed."""
    if fmt == "text":
        pair = Pair(_text(record, "prompt"), _text(record, "chosen"), _text(record, "rejected"))
    elif fmt == "hh":
        split = _split_hh(_text(record, "chosen"), _text(record, "rejected"))
        if isinstance(split, Drop):
            return split
        pair = split
    elif fmt == "chat":
        split = _split_messages(_messages(record, "chosen"), _messages(record, "rejected"))
        if isinstance(split, Drop):
            return split
        pair = split
    elif fmt == "chat-prompt":
        prompt = _messages(record, "prompt")
        chosen, rejected = (_completion(record, side) for side in ("chosen", "rejected"))
        if isinstance(chosen, str) and isinstance(rejected, str):
            pair = Pair(prompt, chosen, rejected)
        else:
            as_turns = [[{"role": "assistant", "content": c}] if isinstance(c, str) else c for c in (chosen, rejected)]
            split = _split_messages(list(prompt) + as_turns[0], list(prompt) + as_turns[1])
            if isinstance(split, Drop):
                return split
            pair = split
    elif fmt == "sharegpt":
        pair = _sharegpt(record)
    else:
        raise ValueError(f"unknown format {fmt!r}")
    _check_text(record, pair)
    return _check_content(pair)


def _check_text(record: dict[str, Any], pair: Pair) -> None:
    """Text a tokenizer cannot take is a malformed record, found here rather than as a crash of the
    tokenizer (which takes the whole batch, and the run, with it)."""
    texts = [pair.prompt] if isinstance(pair.prompt, str) else [v for m in pair.prompt for v in m.values()]
    bad = next((t for t in texts + [pair.chosen, pair.rejected] if _SURROGATE.search(t)), None)
    if bad is None:
        return
    path, value = next(((p, v) for p, v in _strings(record, "") if _SURROGATE.search(v) and (v in bad or bad in v)),
                       ("prompt" if bad in texts else "chosen" if bad == pair.chosen else "rejected", bad))
    raise FieldError(path, surrogate_problem(value))


def _strings(value: Any, path: str):
    """Every string inside a record, with its field path (``chosen[2].content``)."""
    if isinstance(value, str):
        yield path, value
    elif isinstance(value, dict):
        for key, inner in value.items():
            yield from _strings(inner, f"{path}.{key}" if path else str(key))
    elif isinstance(value, (list, tuple)):
        for i, inner in enumerate(value):
            yield from _strings(inner, f"{path}[{i}]")


def _check_content(pair: Pair) -> Pair | Drop:
    prompt_text = pair.prompt if isinstance(pair.prompt, str) else "".join(m["content"] for m in pair.prompt)
    if not prompt_text.strip():
        return Drop("empty_prompt")
    for side in ("chosen", "rejected"):
        if not getattr(pair, side).strip():
            return Drop("empty_response", f"{side} response is empty or whitespace")
    if pair.chosen == pair.rejected:
        return Drop("chosen_equals_rejected")
    return pair


def _field(record: dict[str, Any], name: str) -> Any:
    if name not in record:
        raise FieldError(name, f"missing (the record has {sorted(record)})")
    return record[name]


def _text(record: dict[str, Any], name: str) -> str:
    value = _field(record, name)
    if not isinstance(value, str):
        raise FieldError(name, f"expected a string, got {type(value).__name__}")
    return value


def _message(value: Any, where: str, role_key: str = "role", content_key: str = "content") -> Message:
    if not isinstance(value, dict):
        raise FieldError(where, f"expected a message object, got {type(value).__name__}")
    for key in (role_key, content_key):
        if key not in value:
            raise FieldError(f"{where}.{key}", "missing")
        if not isinstance(value[key], str):
            raise FieldError(f"{where}.{key}", f"expected a string, got {type(value[key]).__name__}")
    return {"role": value[role_key], "content": value[content_key]}


def _messages(record: dict[str, Any], name: str) -> tuple[Message, ...]:
    value = _field(record, name)
    if not isinstance(value, list):
        raise FieldError(name, f"expected a list of messages, got {type(value).__name__}")
    return tuple(_chat_message(m, f"{name}[{i}]") for i, m in enumerate(value))


def chat_messages(value: Any, name: str) -> tuple[Message, ...]:
    """A message list outside a preference record (e.g. a prompt to complete), checked as records' are:
    FieldError naming the field, an unknown role, or text no tokenizer can encode."""
    messages = _messages({name: value}, name)
    for i, message in enumerate(messages):
        for key, text in message.items():
            problem = surrogate_problem(text)
            if problem:
                raise FieldError(f"{name}[{i}].{key}", problem)
    return messages


def surrogate_problem(text: str) -> str | None:
    """What is wrong with text a tokenizer cannot encode (a lone surrogate), or None."""
    at = _SURROGATE.search(text)
    if at is None:
        return None
    return (f"holds U+{ord(at.group()):04X} at character {at.start()}, a lone surrogate that no tokenizer can encode "
            "(a JSON \\u escape without its pair, or bytes that are not UTF-8)")


def _chat_message(value: Any, where: str) -> Message:
    message = _message(value, where)
    if message["role"] not in CHAT_ROLES:
        raise FieldError(f"{where}.role", f"unknown role {message['role']!r} (known: {', '.join(CHAT_ROLES)})")
    return message


def _completion(record: dict[str, Any], name: str) -> str | list[Message]:
    value = _field(record, name)
    if isinstance(value, str):
        return value
    return list(_messages(record, name))


def _split_messages(chosen: list[Message] | tuple[Message, ...], rejected: list[Message] | tuple[Message, ...]) -> Pair | Drop:
    """Shared prompt turns plus the two final assistant turns."""
    for name, turns in (("chosen", chosen), ("rejected", rejected)):
        if not turns:
            raise FieldError(name, "is an empty message list")
        if turns[-1]["role"] != "assistant":
            raise FieldError(f"{name}[{len(turns) - 1}].role", f"the last turn must be 'assistant', got {turns[-1]['role']!r}")
    if list(chosen[:-1]) != list(rejected[:-1]):
        return Drop("prompts_differ", "chosen and rejected do not share the turns before their last assistant turn")
    return Pair(tuple(chosen[:-1]), chosen[-1]["content"], rejected[-1]["content"])


def _split_hh(chosen: str, rejected: str) -> Pair | Drop:
    """Split both dialogues after their last ``\\n\\nAssistant:``; the prompt keeps that marker."""
    cut_c, cut_r = chosen.rfind(HH_ASSISTANT), rejected.rfind(HH_ASSISTANT)
    if cut_c < 0 or cut_r < 0:
        return Drop("no_assistant_turn", f"{'chosen' if cut_c < 0 else 'rejected'} has no {HH_ASSISTANT!r}")
    cut_c += len(HH_ASSISTANT)
    cut_r += len(HH_ASSISTANT)
    if chosen[:cut_c] != rejected[:cut_r]:
        # Real HH data has a few of these: a turn marker inside a response moves the last split point.
        return Drop("prompts_differ", "chosen and rejected differ before their last assistant turn")
    return Pair(chosen[:cut_c], chosen[cut_c:], rejected[cut_r:])


def _sharegpt(record: dict[str, Any]) -> Pair:
    raw = _field(record, "conversations")
    if not isinstance(raw, list):
        raise FieldError("conversations", f"expected a list of turns, got {type(raw).__name__}")
    turns = []
    system = record.get("system")
    if system is not None:
        if not isinstance(system, str):
            raise FieldError("system", f"expected a string, got {type(system).__name__}")
        if system:
            turns.append({"role": "system", "content": system})
    for i, turn in enumerate(raw):
        turns.append(_sharegpt_turn(turn, f"conversations[{i}]"))
    chosen, rejected = (_sharegpt_turn(_field(record, side), side) for side in ("chosen", "rejected"))
    for name, turn in (("chosen", chosen), ("rejected", rejected)):
        if turn["role"] != "assistant":
            raise FieldError(f"{name}.from", f"expected an assistant turn ('gpt'), got {turn['role']!r}")
    return Pair(tuple(turns), chosen["content"], rejected["content"])


def _sharegpt_turn(value: Any, where: str) -> Message:
    message = _message(value, where, role_key="from", content_key="value")
    role = SHAREGPT_ROLES.get(message["role"])
    if role is None:
        raise FieldError(f"{where}.from", f"unknown speaker {message['role']!r} (known: {', '.join(SHAREGPT_ROLES)})")
    return {"role": role, "content": message["content"]}
