"""DreamBench's prompt sets and prompt files."""

import pytest

from personalize.errors import UserError
from personalize.eval import prompts


def test_dreambench_has_25_prompts_per_subject_kind():
    objects = prompts.subject_prompts("dreambench", "sks", "backpack")
    live = prompts.subject_prompts("dreambench", "sks", "dog")
    assert len(objects) == len(live) == 25
    assert objects[0] == "a sks backpack in the jungle"
    assert "a sks dog wearing a santa hat" in live and "a sks backpack wearing a santa hat" not in objects
    assert objects[-1] == "a cube shaped sks backpack"


def test_prompt_file_fills_token_and_class(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("# mine\na {token} {class} on the moon\n\n{0} {1} swimming\n")
    assert prompts.subject_prompts(str(path), "zwx", "cat") == ["a zwx cat on the moon", "zwx cat swimming"]
    (tmp_path / "empty.txt").write_text("# nothing\n")
    with pytest.raises(UserError, match="holds no prompt"):
        prompts.subject_prompts(str(tmp_path / "empty.txt"), "zwx", "cat")
    with pytest.raises(UserError, match="not 'dreambench'"):
        prompts.subject_prompts(str(tmp_path / "missing.txt"), "zwx", "cat")


def test_class_prompts_and_token_removal():
    assert prompts.class_prompts("cat", 3) == ["a photo of a cat", "a cat in the jungle", "a cat in the snow"]
    assert prompts.class_prompts("") == []
    assert prompts.without_token("a sks cat on the beach", "sks") == "a cat on the beach"
