"""EMA math, atomic checkpoints and the optimizer-state round trip through safetensors."""

import torch

from personalize.trainers.common import checkpoints
from personalize.trainers.common.ema import EMA, ema_update_, warmup_decay


def test_ema_update_and_swap():
    param = torch.nn.Parameter(torch.zeros(3))
    ema = EMA([param], decay=0.5)
    with torch.no_grad():
        param.fill_(1.0)
    ema.update()  # first update uses warm-up decay min(0.5, 1/10) = 0.1
    torch.testing.assert_close(ema.shadow[0], torch.full((3,), 0.9))
    with ema.swap():
        torch.testing.assert_close(param.detach(), torch.full((3,), 0.9))
    torch.testing.assert_close(param.detach(), torch.ones(3))
    assert warmup_decay(0.999, 0) == 0.1 and warmup_decay(0.999, 10_000) == 0.999
    shadow = [torch.zeros(2)]
    ema_update_(shadow, [torch.ones(2)], decay=0.75)
    torch.testing.assert_close(shadow[0], torch.full((2,), 0.25))


def test_optimizer_state_round_trips_exactly():
    layer = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(layer.parameters(), lr=1e-2)
    for _ in range(2):
        layer(torch.randn(5, 4)).square().mean().backward()
        optimizer.step()
    tensors, rest = checkpoints.flatten_optimizer(optimizer.state_dict())
    restored = checkpoints.unflatten_optimizer(tensors, rest)
    fresh = torch.optim.AdamW(layer.parameters(), lr=1e-2)
    fresh.load_state_dict(restored)
    for key, value in optimizer.state_dict()["state"][0].items():
        torch.testing.assert_close(fresh.state_dict()["state"][0][key], value)


def test_publish_is_atomic_and_keeps_the_newest(tmp_path):
    root = tmp_path / "checkpoints"
    weights = {"w": torch.ones(2)}
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.ones(2))], lr=0.1)
    for step in (1, 2, 3):
        partial = checkpoints.partial_dir(root, step)
        checkpoints.write_state(
            partial, model=weights, optimizer=optimizer.state_dict(), scheduler={"a": 1}, loop={"step": step}
        )
        checkpoints.publish(root, step, keep=2)
    checkpoints.partial_dir(root, 4).mkdir()  # a run killed while writing step 4
    assert [path.name for path in checkpoints.list_checkpoints(root)] == ["step-000002", "step-000003"]
    assert checkpoints.latest_checkpoint(root).name == "step-000003"
    state = checkpoints.read_state(checkpoints.latest_checkpoint(root))
    assert state["loop"] == {"step": 3} and state["ema"] is None
    torch.testing.assert_close(state["model"]["w"], torch.ones(2))


def test_rng_round_trip(tmp_path):
    generator = torch.Generator().manual_seed(3)
    checkpoints.write_rng(tmp_path, 0, generator)
    expected = (torch.rand(2), torch.rand(2, generator=generator))
    checkpoints.set_rng_state(checkpoints.read_rng(tmp_path, 0), generator)
    torch.testing.assert_close((torch.rand(2), torch.rand(2, generator=generator)), expected)
