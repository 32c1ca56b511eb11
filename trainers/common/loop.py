"""The shared training loop on accelerate: accumulation, clipping, LR schedule, EMA, checkpoints.

`train_loop` knows nothing about diffusion: a recipe gives it `compute_loss(batch) -> (loss,
parts)` and a `BatchStream`. One optimizer step = `grad_accum` micro-batches per process; the
loop checkpoints every N steps (resumable bit-exactly: weights, optimizer, LR schedule, EMA, RNG
and the position in the data stream) and stops with a UserError on a NaN/inf loss.

Ctrl-C or SIGTERM ask the loop to stop after the optimizer step in progress (so the state is a whole
step, and resuming is exact): it writes a checkpoint, returns with `state.stopped_early`, the recipe
saves its adapter as usual, skips the final samples, and `raise_if_interrupted` tells the user where
both are. A second Ctrl-C stops at once.
"""

from __future__ import annotations

import math
import signal
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from personalize.errors import UserError
from personalize.trainers.common import checkpoints
from personalize.trainers.common.ema import EMA
from personalize.trainers.common.step_memory import lean_forward_allocations, lean_frozen_convs, native_cpu_convolutions


class BatchStream:
    """An endless, deterministic batch sequence over epochs, dealt round-robin to the processes.

    `make_loader(epoch)` must return the same batches in the same order for the same epoch
    (a loader seeded with seed + epoch). Global batch g goes to process g % world; `consumed`
    counts rounds, so resuming skips exactly the batches already trained on.
    """

    def __init__(self, make_loader: Callable[[int], Iterable[Any]], rank: int = 0, world: int = 1) -> None:
        self.make_loader = make_loader
        self.rank = rank
        self.world = world
        self.consumed = 0  # rounds of `world` batches handed out

    def __iter__(self) -> Iterator[Any]:
        position = self.consumed * self.world  # global index of the next batch
        skip, epoch = position, 0
        while True:
            loader = self.make_loader(epoch)
            length = len(loader) if hasattr(loader, "__len__") else None  # type: ignore[arg-type]
            if length == 0:
                raise UserError("the training data yields no batch; use a smaller --batch-size or more images")
            if length is not None and skip >= length:  # a whole epoch already used: skip it unloaded
                skip -= length
                epoch += 1
                continue
            for index, batch in enumerate(loader):
                if index < skip:
                    continue
                if position % self.world == self.rank:
                    self.consumed = position // self.world + 1  # before yield: a checkpoint may follow
                    yield batch
                position += 1
            skip = 0
            epoch += 1


@dataclass
class LoopSettings:
    steps: int
    grad_accum: int = 1
    max_grad_norm: float = 1.0
    checkpoint_every: int = 0  # 0: never
    keep_checkpoints: int = 2
    checkpoint_root: Path | None = None
    validate_every: int = 0
    progress: bool = True
    average_gradients: list[torch.nn.Parameter] = field(default_factory=list)  # trained outside DDP
    # step_memory.py: frozen convs of these models keep no input; fp32 CPU convs skip oneDNN; the forward
    # pass runs under the lean glibc allocator policy
    lean_models: list[torch.nn.Module] = field(default_factory=list)
    native_cpu_conv: bool = False
    lean_cpu_allocator: bool = False
    cpu_threads: str = "auto"  # on a CPU: auto | all | N (see cpu_threads below)
    report_to: str = "none"  # accelerate tracker (personalize.eval.logs): loss, lr, grad norm per step
    run_dir: Path | None = None  # where loss.png goes at the end (and the TensorBoard logs/)

    @classmethod
    def from_config(cls, config: Any, checkpoint_root: Path, **more: Any) -> LoopSettings:
        """The loop keys every recipe config has (an LLM config has no validate_every: 0)."""
        return cls(
            steps=config.steps,
            grad_accum=config.grad_accum,
            max_grad_norm=config.max_grad_norm,
            checkpoint_every=config.checkpoint_every,
            keep_checkpoints=config.keep_checkpoints,
            checkpoint_root=checkpoint_root,
            validate_every=getattr(config, "validate_every", 0),
            cpu_threads=str(getattr(config, "cpu_threads", "auto")),
            report_to=getattr(config, "report_to", "none"),
            run_dir=checkpoint_root.parent,
            **more,
        )


@dataclass
class TrainState:
    """Everything a checkpoint holds; `step` is the number of optimizer steps done."""

    named_params: dict[str, torch.nn.Parameter]
    optimizer: Any
    lr_scheduler: Any
    stream: BatchStream
    generator: torch.Generator
    ema: EMA | None = None
    step: int = 0
    losses: list[float] = field(default_factory=list)
    stopped_early: bool = False  # Ctrl-C / SIGTERM: stopped after `step`, checkpoint in `stop_checkpoint`
    stop_checkpoint: Path | None = None


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM stopped a run after its adapter and a resumable checkpoint were saved."""


@contextmanager
def stop_requests() -> Iterator[Callable[[], bool]]:
    """Ctrl-C / SIGTERM set a flag the loop reads between steps; a second one interrupts at once.
    (Signal handlers can only be installed from the main thread: elsewhere nothing changes.)"""
    requested = False

    def ask(signum: int, frame: Any) -> None:
        nonlocal requested
        if requested:
            raise KeyboardInterrupt
        requested = True
        print(
            "\nstopping after this step: saving the adapter and a checkpoint (Ctrl-C again to stop at once)",
            file=sys.stderr,
            flush=True,
        )

    if threading.current_thread() is not threading.main_thread():
        yield lambda: False
        return
    previous = {sig: signal.signal(sig, ask) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield lambda: requested
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


# Below this many parameters a step's matrices are too small to split across cores: one thread is
# faster, and on a busy machine several threads that spin-wait on each other are many times slower
# (benchmarks/README.md, "CPU threads").
SMALL_MODEL_PARAMETERS = 50_000_000


@contextmanager
def cpu_threads(choice: str, models: list[torch.nn.Module], device: Any) -> Iterator[int]:
    """torch's intra-op threads for the loop on a CPU: `auto` -> 1 for a model under SMALL_MODEL_PARAMETERS
    (else torch's default, one per core), `all` -> torch's default, `N` -> N. `auto` leaves an explicit
    OMP_NUM_THREADS alone. The previous count comes back after the loop."""
    import os

    before = torch.get_num_threads()
    threads = before
    if getattr(device, "type", str(device)) == "cpu":
        if choice == "auto" and "OMP_NUM_THREADS" not in os.environ:
            size = sum(param.numel() for model in models for param in model.parameters())
            threads = 1 if size < SMALL_MODEL_PARAMETERS else before
        elif choice.isdigit() and int(choice) > 0:
            threads = int(choice)
        elif choice not in ("auto", "all"):
            raise UserError(f"cpu_threads is auto, all or a positive number (got {choice!r})")
    torch.set_num_threads(threads)
    try:
        yield threads
    finally:
        torch.set_num_threads(before)


def any_process(accelerator: Any, flag: bool) -> bool:
    """True on every process when it is True on one (all ranks must stop at the same step)."""
    if accelerator.num_processes == 1:
        return flag
    import torch.distributed as dist

    value = torch.tensor([float(flag)], device=accelerator.device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def needs_final_samples(state: TrainState, samples: list[Path]) -> bool:
    """The end-of-run grid is drawn unless the last step already has one or the run was stopped."""
    return not state.stopped_early and not (samples and samples[-1].stem.endswith(f"{state.step:06d}"))


def raise_if_interrupted(state: TrainState, output: Path, steps: int) -> None:
    """After a stopped run has saved its outputs: say where they are, as a KeyboardInterrupt (exit 130)."""
    if state.stopped_early:
        raise TrainingInterrupted(
            f"interrupted at step {state.step} of {steps}: the adapter so far is in {output}, and "
            f"{state.stop_checkpoint} holds the run; continue it with --resume (same --output)"
        )


def save_checkpoint(accelerator: Any, state: TrainState, root: Path, keep: int) -> Path:
    """Atomic: every process writes into step-N.partial/, then the main process renames it."""
    partial = checkpoints.partial_dir(root, state.step)
    if accelerator.is_main_process:
        partial.mkdir(parents=True, exist_ok=True)
        checkpoints.write_state(
            partial,
            model={name: param for name, param in state.named_params.items()},
            optimizer=state.optimizer.state_dict(),
            scheduler=state.lr_scheduler.state_dict(),
            loop={"step": state.step, "consumed": state.stream.consumed, "losses": state.losses},
            ema=state.ema.state_dict() if state.ema is not None else None,
        )
    accelerator.wait_for_everyone()
    checkpoints.write_rng(partial, accelerator.process_index, state.generator)
    accelerator.wait_for_everyone()
    final = checkpoints.checkpoint_dir(root, state.step)
    if accelerator.is_main_process:
        checkpoints.publish(root, state.step, keep)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator: Any, state: TrainState, folder: Path) -> None:
    """Restore `state` (in place) from a checkpoint folder written by save_checkpoint."""
    saved = checkpoints.read_state(folder)
    missing = sorted(set(state.named_params) - set(saved["model"]))
    if missing:
        raise UserError(
            f"checkpoint {folder} does not match this run (no weights for {missing[0]}); "
            "resume with the same method and settings, or start a new --output"
        )
    with torch.no_grad():
        for name, param in state.named_params.items():
            param.copy_(saved["model"][name])
    state.optimizer.load_state_dict(saved["optimizer"])
    state.lr_scheduler.load_state_dict(saved["scheduler"])
    if state.ema is not None and saved["ema"] is not None:
        state.ema.load_state_dict(saved["ema"])
    state.step = int(saved["loop"]["step"])
    consumed = saved["loop"]["consumed"]  # a list for paired streams (prior preservation: instance, class)
    state.stream.consumed = [int(value) for value in consumed] if isinstance(consumed, list) else int(consumed)
    state.losses = list(saved["loop"].get("losses", []))
    rng = checkpoints.read_rng(folder, accelerator.process_index)
    if rng is not None:
        checkpoints.set_rng_state(rng, state.generator)


def train_loop(
    accelerator: Any,
    models: list[torch.nn.Module],
    compute_loss: Callable[[Any], tuple[torch.Tensor, dict[str, float]]],
    state: TrainState,
    settings: LoopSettings,
    on_validate: Callable[[int], None] | None = None,
) -> TrainState:
    """Run optimizer steps from state.step to settings.steps; returns the state (losses per step)."""
    from tqdm.auto import tqdm

    from personalize.eval import logs

    if settings.run_dir is not None:
        logs.start_trackers(accelerator, settings.report_to, settings.run_dir)
    bar = tqdm(
        total=settings.steps,
        initial=state.step,
        desc="training",
        disable=not (settings.progress and accelerator.is_local_main_process),
        dynamic_ncols=True,
    )
    batches = iter(state.stream)
    params = list(state.named_params.values())
    with (
        cpu_threads(settings.cpu_threads, [*models, *settings.lean_models], accelerator.device),
        lean_frozen_convs(*settings.lean_models),
        native_cpu_convolutions(settings.native_cpu_conv),
        stop_requests() as stop_requested,
    ):
        while state.step < settings.steps:
            step_loss = 0.0
            for _ in range(settings.grad_accum):
                batch = next(batches)
                with accelerator.accumulate(*models):
                    with lean_forward_allocations(settings.lean_cpu_allocator):
                        loss, _parts = compute_loss(batch)
                    if not torch.isfinite(loss.detach()):
                        _stop_on_nan(float(loss.detach()), state.step, settings.checkpoint_root)
                    accelerator.backward(loss)
                    step_loss += float(loss.detach()) / settings.grad_accum
            if accelerator.num_processes > 1 and settings.average_gradients:
                average_gradients(settings.average_gradients, accelerator.num_processes)
            grad_norm = None
            if settings.max_grad_norm > 0:
                grad_norm = accelerator.clip_grad_norm_(params, settings.max_grad_norm)  # the norm before clipping
            elif accelerator.trackers:
                grad_norm = torch.nn.utils.clip_grad_norm_(params, float("inf"))  # measures, clips nothing
            state.optimizer.step()
            state.lr_scheduler.step()
            state.optimizer.zero_grad(set_to_none=True)
            if state.ema is not None:
                state.ema.update()
            state.step += 1
            state.losses.append(step_loss)
            bar.update(1)
            lr = state.lr_scheduler.get_last_lr()[0]
            bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr:.2e}")
            values = {"loss": step_loss, "lr": lr}
            logs.log_values(
                accelerator, values if grad_norm is None else {**values, "grad_norm": float(grad_norm)}, state.step
            )
            saved = None
            if settings.checkpoint_every and state.step % settings.checkpoint_every == 0 and settings.checkpoint_root:
                saved = save_checkpoint(accelerator, state, settings.checkpoint_root, settings.keep_checkpoints)
            if any_process(accelerator, stop_requested()) and state.step < settings.steps:
                if saved is None and settings.checkpoint_root is not None:
                    saved = save_checkpoint(accelerator, state, settings.checkpoint_root, settings.keep_checkpoints)
                state.stopped_early, state.stop_checkpoint = True, saved
                break
            if on_validate is not None and settings.validate_every and state.step % settings.validate_every == 0:
                on_validate(state.step)
    bar.close()
    if settings.run_dir is not None and accelerator.is_main_process:
        logs.write_loss_plot(state.losses, settings.run_dir / "loss.png", say=bar.write)
    return state


def average_gradients(params: list[torch.nn.Parameter], world: int) -> None:
    """grad <- mean over processes (what DDP does for the modules it wraps)."""
    import torch.distributed as dist

    for param in params:
        if param.grad is None:
            param.grad = torch.zeros_like(param)  # every rank must join each all_reduce
        dist.all_reduce(param.grad)
        param.grad.div_(world)


def _stop_on_nan(value: float, step: int, root: Path | None) -> None:
    last = checkpoints.latest_checkpoint(root) if root is not None else None
    where = f"; the last good checkpoint is {last} (continue from it with --resume)" if last else ""
    raise UserError(
        f"the loss became {value} at step {step + 1}: training diverged; lower --lr, or use "
        f"--mixed-precision bf16 or no instead of fp16{where}"
    )


def warmup_steps(steps: int, fraction: float) -> int:
    """Warm-up length as a fraction of the run, rounded up (0 stays 0)."""
    return math.ceil(steps * fraction) if fraction > 0 else 0
