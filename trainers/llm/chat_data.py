"""Instruction-tuning data: JSONL conversations -> token ids with labels on assistant tokens only.

One JSON object per line, either
    {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}
or  {"prompt": "...", "completion": "..."}   (= one user turn and one assistant turn),
with an optional "image"/"images" (path or list of paths, relative to the file) for a VLM.

Each conversation is formatted with the tokenizer's chat template. Labels are the input ids on the
assistant's tokens and -100 (ignored by the cross-entropy) everywhere else: read from the template's
`{% generation %}` marks when it has them, otherwise by rendering each assistant turn's prefix
(`add_generation_prompt=True`) and labelling the tokens between that prefix and the end of the turn.
Conversations longer than `max_length` are cut at the end and counted in the report; packing puts
whole conversations into rows of at most `max_length` tokens, with position ids restarting at each
conversation (transformers then keeps attention inside each conversation).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from personalize.errors import UserError

IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant")
GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")


@dataclass
class Conversation:
    messages: list[dict[str, str]]
    images: list[str] = field(default_factory=list)  # absolute paths
    line: int = 0


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]
    images: list[str] = field(default_factory=list)
    pixels: Any = None  # VLM: (n_images, 3, H, W) pixel values


@dataclass
class ChatReport:
    lines: int = 0
    skipped: list[str] = field(default_factory=list)  # "line N: reason"
    truncated: int = 0
    dropped_tokens: int = 0
    no_answer: int = 0  # conversations whose assistant turns were cut off entirely
    tokens: int = 0
    answer_tokens: int = 0

    def summary(self) -> str:
        used = self.lines - len(self.skipped) - self.no_answer
        text = f"{used} conversations ({self.tokens} tokens, {self.answer_tokens} trained on)"
        if self.skipped:
            text += f"; skipped {len(self.skipped)} lines ({'; '.join(self.skipped[:3])})"
        if self.truncated:
            text += (
                f"; {self.truncated} truncated to max_length ({self.dropped_tokens} tokens dropped; "
                "raise --max-length to keep them)"
            )
        if self.no_answer:
            text += f"; {self.no_answer} dropped: no assistant token left after truncation"
        return text


# --- reading --------------------------------------------------------------------------------


def _messages(record: dict[str, Any]) -> list[dict[str, str]]:
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise ValueError("'messages' must be a non-empty list")
        out = []
        for index, message in enumerate(messages):
            if not isinstance(message, dict) or "role" not in message or "content" not in message:
                raise ValueError(f"message {index} needs 'role' and 'content'")
            if message["role"] not in ROLES:
                raise ValueError(f"message {index} has role '{message['role']}' (use {', '.join(ROLES)})")
            if not isinstance(message["content"], str):
                raise ValueError(f"message {index} content must be text")
            out.append({"role": message["role"], "content": message["content"]})
        if not any(m["role"] == "assistant" for m in out):
            raise ValueError("no assistant message to learn from")
        return out
    if "prompt" in record and "completion" in record:
        if not isinstance(record["prompt"], str) or not isinstance(record["completion"], str):
            raise ValueError("'prompt' and 'completion' must be text")
        return [{"role": "user", "content": record["prompt"]}, {"role": "assistant", "content": record["completion"]}]
    raise ValueError("needs 'messages' or 'prompt' + 'completion'")


def _images(record: dict[str, Any], folder: Path) -> list[str]:
    value = record.get("images", record.get("image", []))
    paths = [value] if isinstance(value, str) else value
    if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
        raise ValueError("'image'/'images' must be a path or a list of paths")
    return [str((folder / Path(p).expanduser()).absolute()) for p in paths]


def read_conversations(path: str | Path, report: ChatReport | None = None) -> list[Conversation]:
    """Parse a JSONL file; malformed lines are reported (by line number) and skipped."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"--data {path} does not exist; pass a .jsonl file of conversations")
    report = report if report is not None else ChatReport()
    conversations = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text; pass a .jsonl file of conversations") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        report.lines += 1
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError("not a JSON object")
            conversations.append(Conversation(_messages(record), _images(record, path.parent), number))
        except (ValueError, json.JSONDecodeError) as error:  # JSONDecodeError is a ValueError
            report.skipped.append(f"line {number}: {str(error).splitlines()[0][:80]}")
    if not conversations:
        why = f" ({'; '.join(report.skipped[:3])})" if report.skipped else ""
        raise UserError(
            f"{path} holds no usable conversation{why}; each line must be "
            '{"messages": [{"role": "user", "content": ...}, {"role": "assistant", "content": ...}]} '
            'or {"prompt": ..., "completion": ...}'
        )
    return conversations


# --- tokenizing -----------------------------------------------------------------------------


def _ids(rendered: Any) -> list[int]:
    if isinstance(rendered, dict) or hasattr(rendered, "keys"):
        rendered = rendered["input_ids"]
    return list(rendered)


def _render(tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool) -> list[int]:
    return _ids(
        tokenizer.apply_chat_template(
            messages, tokenize=True, add_generation_prompt=add_generation_prompt, return_dict=True
        )
    )


def assistant_labels(tokenizer: Any, messages: list[dict[str, str]]) -> tuple[list[int], list[int]]:
    """(input_ids, labels): labels = ids on assistant tokens, IGNORE_INDEX elsewhere."""
    if tokenizer.chat_template is None:
        raise UserError("this tokenizer has no chat template; use a chat/instruct model or set tokenizer.chat_template")
    if GENERATION_TAG.search(tokenizer.chat_template):  # {% generation %} marks the assistant's tokens
        rendered = tokenizer.apply_chat_template(
            messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        ids = _ids(rendered)
        mask = list(rendered["assistant_masks"])
        return ids, [t if m else IGNORE_INDEX for t, m in zip(ids, mask)]
    ids = _render(tokenizer, messages, add_generation_prompt=False)
    labels = [IGNORE_INDEX] * len(ids)
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = len(_render(tokenizer, messages[:index], add_generation_prompt=True))
        end = len(_render(tokenizer, messages[: index + 1], add_generation_prompt=False))
        eos = tokenizer.eos_token_id
        if eos in ids[start:end]:  # the turn ends at its end-of-sequence token, not at the template's newline
            end = start + max(i for i, t in enumerate(ids[start:end]) if t == eos) + 1
        labels[start:end] = ids[start:end]
    return ids, labels


def tokenize(
    tokenizer: Any, conversations: Sequence[Conversation], max_length: int, report: ChatReport | None = None
) -> list[Example]:
    """Conversations -> examples cut to `max_length`; those left without an answer token are dropped."""
    if max_length < 2:
        raise UserError(f"--max-length must be at least 2 (got {max_length})")
    report = report if report is not None else ChatReport()
    examples = []
    for conversation in conversations:
        ids, labels = assistant_labels(tokenizer, conversation.messages)
        if len(ids) > max_length:
            report.truncated += 1
            report.dropped_tokens += len(ids) - max_length
            ids, labels = ids[:max_length], labels[:max_length]
        answer = sum(label != IGNORE_INDEX for label in labels[1:])  # the first token is never predicted
        if answer == 0:
            report.no_answer += 1
            continue
        report.tokens += len(ids)
        report.answer_tokens += answer
        examples.append(Example(ids, labels, conversation.images))
    if not examples:
        raise UserError(f"no conversation keeps an assistant token within --max-length {max_length}; raise it")
    return examples


# --- packing and batching -------------------------------------------------------------------


def pack(examples: Sequence[Example], max_length: int) -> list[list[Example]]:
    """First-fit-decreasing bins of whole examples, each bin at most `max_length` tokens (deterministic)."""
    order = sorted(range(len(examples)), key=lambda i: (-len(examples[i].input_ids), i))
    bins: list[list[int]] = []
    room: list[int] = []
    for index in order:
        size = len(examples[index].input_ids)
        slot = next((b for b, free in enumerate(room) if free >= size), None)
        if slot is None:
            bins.append([index])
            room.append(max_length - size)
        else:
            bins[slot].append(index)
            room[slot] -= size
    return [[examples[i] for i in sorted(members)] for members in bins]


def collate(rows: Sequence[Sequence[Example]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Rows of (packed) examples -> right-padded input_ids / labels (B, T) and attention_mask.

    Packed rows (several examples) get position_ids restarting at 0 per example and no attention
    mask: transformers then builds the block-diagonal causal mask from the position ids."""
    width = max(sum(len(e.input_ids) for e in row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)  # (B, T)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        offset = 0
        for example in row:
            n = len(example.input_ids)
            input_ids[r, offset : offset + n] = torch.tensor(example.input_ids)
            labels[r, offset : offset + n] = torch.tensor(example.labels)
            labels[r, offset] = IGNORE_INDEX  # never predict a conversation's first token from the previous one
            positions[r, offset : offset + n] = torch.arange(n)
            attention[r, offset : offset + n] = 1
            offset += n
    if any(len(row) > 1 for row in rows):
        return {"input_ids": input_ids, "labels": labels, "position_ids": positions}
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention}
