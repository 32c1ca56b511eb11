"""Chat data: assistant-only labels, malformed lines, truncation, packing (tiny-llama's tokenizer)."""

import json

import pytest
import torch

from personalize.errors import UserError
from personalize.models import build_tiny
from personalize.trainers.llm import chat_data

MESSAGES = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "what is two"},
    {"role": "assistant", "content": "two is a number"},
    {"role": "user", "content": "and red"},
    {"role": "assistant", "content": "a color"},
]


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny("tiny-llama")[1]


def _write(path, lines):
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return path


def test_labels_cover_exactly_the_assistant_tokens(tokenizer):
    ids, labels = chat_data.assistant_labels(tokenizer, MESSAGES)
    assert len(ids) == len(labels)
    trained = [i for i, label in enumerate(labels) if label != chat_data.IGNORE_INDEX]
    assert all(labels[i] == ids[i] for i in trained)
    # the trained positions, grouped into runs, decode to exactly the two answers (each with its </s>)
    runs, current = [], [trained[0]]
    for i in trained[1:]:
        if i == current[-1] + 1:
            current.append(i)
        else:
            runs.append(current)
            current = [i]
    runs.append(current)
    texts = [tokenizer.decode([ids[i] for i in run]) for run in runs]
    assert texts == ["two is a number</s>", "a color</s>"]


def test_template_without_generation_tags_gives_the_same_labels(tokenizer):
    plain = build_tiny("tiny-llama")[1]
    plain.chat_template = tokenizer.chat_template.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    assert chat_data.assistant_labels(plain, MESSAGES) == chat_data.assistant_labels(tokenizer, MESSAGES)


def test_malformed_lines_are_reported_by_number_and_skipped(tmp_path):
    path = _write(
        tmp_path / "chat.jsonl",
        [
            {"prompt": "hi", "completion": "hello"},
            "{not json",
            {"messages": [{"role": "user", "content": "no answer"}]},
            "",
            {"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]},
            {"question": "wrong keys"},
            {"messages": MESSAGES},
        ],
    )
    report = chat_data.ChatReport()
    conversations = chat_data.read_conversations(path, report)
    assert [c.line for c in conversations] == [1, 7]
    assert [entry.split(":")[0] for entry in report.skipped] == ["line 2", "line 3", "line 5", "line 6"]
    assert "skipped 4 lines (line 2" in report.summary()
    assert conversations[0].messages == [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
    ]


def test_an_empty_dataset_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="no usable conversation"):
        chat_data.read_conversations(_write(tmp_path / "empty.jsonl", [""]))
    with pytest.raises(UserError, match=r"line 1: .*no usable conversation|no usable conversation.*line 1"):
        chat_data.read_conversations(_write(tmp_path / "bad.jsonl", ["[1, 2]"]))
    with pytest.raises(UserError, match="does not exist"):
        chat_data.read_conversations(tmp_path / "missing.jsonl")


def test_truncation_is_reported_and_answerless_rows_dropped(tokenizer):
    conversations = [chat_data.Conversation(MESSAGES), chat_data.Conversation(MESSAGES[:3])]
    full = len(chat_data.assistant_labels(tokenizer, MESSAGES)[0])
    report = chat_data.ChatReport()
    examples = chat_data.tokenize(tokenizer, conversations, full - 3, report)
    assert report.truncated == 1 and report.dropped_tokens == 3
    assert all(len(e.input_ids) <= full - 3 for e in examples)
    assert "1 truncated to max_length (3 tokens dropped" in report.summary()
    _, labels = chat_data.assistant_labels(tokenizer, MESSAGES[:3])
    prompt_only = next(i for i, label in enumerate(labels) if label != chat_data.IGNORE_INDEX)  # answer start
    with pytest.raises(UserError, match="raise it"):
        chat_data.tokenize(tokenizer, conversations[1:], prompt_only, chat_data.ChatReport())


def test_packing_keeps_conversations_whole_and_apart(tokenizer):
    model = build_tiny("tiny-llama")[0]
    conversations = [
        chat_data.Conversation(MESSAGES[:3]),
        chat_data.Conversation(MESSAGES),
        chat_data.Conversation([{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi"}]),
    ]
    examples = chat_data.tokenize(tokenizer, conversations, 256)
    rows = chat_data.pack(examples, max_length=256)
    assert len(rows) == 1 and sorted(len(e.input_ids) for e in rows[0]) == sorted(len(e.input_ids) for e in examples)
    packed = chat_data.collate(rows, tokenizer.pad_token_id)
    assert "attention_mask" not in packed and packed["position_ids"][0, 0] == 0
    with torch.no_grad():
        inputs = {k: v for k, v in packed.items() if k != "labels"}
        logits = model(**inputs, use_cache=False).logits[0]  # (T, V); no cache: packed rows get a block mask
        offset = 0
        for example in rows[0]:
            alone = model(input_ids=torch.tensor([example.input_ids]), use_cache=False).logits[0]
            n = len(example.input_ids)
            torch.testing.assert_close(logits[offset : offset + n], alone, atol=1e-5, rtol=1e-4)
            offset += n
    # the first token of each packed conversation is never a target
    starts = (packed["position_ids"][0] == 0).nonzero().flatten().tolist()
    assert all(packed["labels"][0, s] == chat_data.IGNORE_INDEX for s in starts)
    assert chat_data.pack(examples, max_length=min(len(e.input_ids) for e in examples) + 1) != rows


@pytest.mark.parametrize("preset", ["llama-lora", "llama-qlora", "qwen-qlora", "llava-lora", "tiny-llama"])
def test_presets_build_a_valid_config(preset, tmp_path):
    from personalize.config import build
    from personalize.trainers.llm.config import LLMTrainConfig, resolve

    data = _write(tmp_path / "chat.jsonl", [{"prompt": "hi", "completion": "hello"}])
    config = resolve(build(LLMTrainConfig, preset=preset, flags={"data": str(data)}), rows=100)
    assert config.steps >= 1 and config.lr > 0 and config.rank
