"""personalize.models.mapped.cast_from_files: a loaded module cast one tensor at a time from its files."""

import torch

from personalize.models import build_tiny, load_pipeline
from personalize.models.mapped import cast_from_files


def test_cast_from_files_gives_what_to_gives_and_declines_what_it_cannot_do(tmp_path):
    build_tiny("tiny-flux").save_pretrained(tmp_path)
    ours = load_pipeline(str(tmp_path), torch_dtype=torch.float32).transformer
    stock = load_pipeline(str(tmp_path), torch_dtype=torch.float32).transformer.to(torch.bfloat16)
    assert cast_from_files(ours, torch.bfloat16)
    for (name, mine), (_, theirs) in zip(ours.state_dict().items(), stock.state_dict().items(), strict=True):
        assert mine.dtype == theirs.dtype and torch.equal(mine, theirs), name
    assert not cast_from_files(ours, torch.bfloat16)  # already bf16
    assert not cast_from_files(build_tiny("tiny-flux").transformer, torch.bfloat16)  # built in code: no files
