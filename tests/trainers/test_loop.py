"""The generic loop: batches dealt and resumed exactly, steps lower the loss, 2+2 steps == 4 steps."""

import pytest
import torch
from accelerate import Accelerator
from diffusers.optimization import get_scheduler

from personalize.trainers.common import checkpoints
from personalize.trainers.common.ema import EMA
from personalize.trainers.common.loop import BatchStream, LoopSettings, TrainState, load_checkpoint, train_loop


def _loader(epoch):
    order = torch.randperm(6, generator=torch.Generator().manual_seed(100 + epoch)).tolist()
    return [[f"e{epoch}b{index}"] for index in order]


def test_stream_deals_round_robin_and_resumes_where_it_stopped():
    single = BatchStream(_loader)
    reference = [batch for _, batch in zip(range(14), single)]
    ranks = [BatchStream(_loader, rank=rank, world=2) for rank in (0, 1)]
    dealt = [[batch for _, batch in zip(range(7), stream)] for stream in ranks]
    assert [batch for pair in zip(*dealt) for batch in pair] == reference  # interleaved == one process
    first = BatchStream(_loader)
    head = [batch for _, batch in zip(range(8), first)]
    resumed = BatchStream(_loader)
    resumed.consumed = first.consumed
    assert head + [batch for _, batch in zip(range(6), resumed)] == reference


def _setup(tmp_path, seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.1), torch.nn.Linear(8, 1))
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=1, num_training_steps=4)
    model, optimizer = accelerator.prepare(model, optimizer)
    data = torch.randn(32, 4, generator=torch.Generator().manual_seed(1))
    targets = data.sum(1, keepdim=True)

    def make_loader(epoch):
        order = torch.randperm(32, generator=torch.Generator().manual_seed(epoch)).tolist()
        return [order[start : start + 4] for start in range(0, 32, 4)]

    generator = torch.Generator().manual_seed(seed)

    def compute_loss(rows):
        noise = 0.01 * torch.randn(len(rows), 1, generator=generator)
        loss = (model(data[rows]) - targets[rows] - noise).square().mean()
        return loss, {}

    named = {name: param for name, param in accelerator.unwrap_model(model).named_parameters()}
    state = TrainState(named, optimizer, scheduler, BatchStream(make_loader), generator, EMA(list(named.values())))
    return accelerator, model, compute_loss, state


def _fixed_batch_loss(model):
    data = torch.randn(32, 4, generator=torch.Generator().manual_seed(1))
    model.eval()
    with torch.no_grad():
        return float((model(data) - data.sum(1, keepdim=True)).square().mean())


def test_steps_lower_the_loss(tmp_path):
    accelerator, model, compute_loss, state = _setup(tmp_path)
    before = _fixed_batch_loss(model)
    model.train()
    settings = LoopSettings(steps=20, grad_accum=2, progress=False)
    state.lr_scheduler = get_scheduler("constant", state.optimizer)
    train_loop(accelerator, [model], compute_loss, state, settings)
    assert state.step == 20 and len(state.losses) == 20
    assert _fixed_batch_loss(model) < 0.5 * before


def test_resume_is_bit_exact(tmp_path):
    accelerator, model, compute_loss, state = _setup(tmp_path)
    settings = LoopSettings(steps=4, grad_accum=2, checkpoint_every=2, checkpoint_root=tmp_path / "a", progress=False)
    train_loop(accelerator, [model], compute_loss, state, settings)
    uninterrupted = {name: param.detach().clone() for name, param in state.named_params.items()}

    accelerator, model, compute_loss, state = _setup(tmp_path)  # a "killed" run: stops after step 2
    settings_b = LoopSettings(steps=2, grad_accum=2, checkpoint_every=2, checkpoint_root=tmp_path / "b", progress=False)
    train_loop(accelerator, [model], compute_loss, state, settings_b)
    torch.manual_seed(12345)  # the new process starts with other RNG state: the checkpoint must restore it
    accelerator, model, compute_loss, state = _setup(tmp_path, seed=7)
    load_checkpoint(accelerator, state, checkpoints.latest_checkpoint(tmp_path / "b"))
    assert state.step == 2
    settings_b.steps = 4
    train_loop(accelerator, [model], compute_loss, state, settings_b)
    for name, value in uninterrupted.items():
        assert torch.equal(state.named_params[name].detach(), value), name
    assert [path.name for path in checkpoints.list_checkpoints(tmp_path / "b")] == ["step-000002", "step-000004"]


def test_nan_loss_stops_with_a_user_error(tmp_path):
    import pytest

    from personalize.errors import UserError

    accelerator, model, _, state = _setup(tmp_path)
    settings = LoopSettings(steps=2, progress=False)
    with pytest.raises(UserError, match="diverged"):
        train_loop(
            accelerator, [model], lambda rows: (torch.tensor(float("nan"), requires_grad=True), {}), state, settings
        )


def test_cpu_threads_fit_the_model(monkeypatch):
    """auto: one thread for a small model (no env var needed), torch's count for a large one; restored after."""
    from personalize.errors import UserError
    from personalize.trainers.common.loop import SMALL_MODEL_PARAMETERS, cpu_threads

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    torch.set_num_threads(2)
    small = torch.nn.Linear(4, 4)
    large = torch.nn.Module()
    large.weight = torch.nn.Parameter(torch.empty(SMALL_MODEL_PARAMETERS + 1, 1, device="meta"), requires_grad=False)
    with cpu_threads("auto", [small], torch.device("cpu")) as threads:
        assert threads == 1 and torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2
    with cpu_threads("auto", [large], torch.device("cpu")) as threads:
        assert threads == 2
    with cpu_threads("3", [small], torch.device("cpu")) as threads:
        assert threads == 3 == torch.get_num_threads()
    with cpu_threads("all", [small], torch.device("cpu")) as threads:
        assert threads == 2
    monkeypatch.setenv("OMP_NUM_THREADS", "2")  # the user's explicit choice wins over auto
    with cpu_threads("auto", [small], torch.device("cpu")) as threads:
        assert threads == 2
    with pytest.raises(UserError, match="cpu_threads"), cpu_threads("many", [small], torch.device("cpu")):
        pass


def test_end_of_run_samples_keep_the_loops_thread_choice(quick, monkeypatch):
    """The final grid is drawn after the loop has restored torch's thread count: it must still use the
    run's choice (one thread for a tiny model), else a busy machine spends minutes on two sample images."""
    from personalize.trainers.common import validation

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    torch.set_num_threads(2)
    seen: list[int] = []
    real = validation.sample_grid

    def recording(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return real(*args, **kwargs)

    monkeypatch.setattr(validation, "sample_grid", recording)
    quick(steps=2, validation_steps=5, validation_images=1)  # no mid-run grid: only the end-of-run one
    assert seen == [1]
    assert torch.get_num_threads() == 2  # and the caller's count comes back
