"""The one training loop of the project: RGB CLIP pretraining and both alignment stages run through it.

It follows open_clip's recipe (the paper trains its RGB teacher "with standard OpenCLIP settings",
METHOD.md section 2): AdamW without weight decay on gains, biases, embeddings and the temperature, a
linear warm-up into a cosine decay to zero over all steps, gradient-norm clipping. On top of that it
gives every stage the same guarantees:

- **Resume equals uninterrupted, mid-epoch too.** Every ``checkpoint_every`` steps and at the end
  of every epoch ``checkpoint_dir/last.pt`` is written atomically
  (:func:`gsclip_lib.atomic_files.save_torch`) with the trainable parameters and all buffers, the
  optimizer and scheduler states, the step, the history (and the half-filled log row) and every
  rank's RNG states. A call that finds ``last.pt`` continues from it, and ends with the same
  parameters as a run never interrupted, provided ``batches(epoch, start)`` returns, for the same
  epoch, the same batches from batch ``start`` on (derive any shuffling from the seed and the epoch,
  not from a global RNG; :mod:`gsclip_lib.data.streaming` fast-forwards a shard stream that way).
  A run killed between checkpoints repeats at most ``checkpoint_every`` steps. A call whose run is
  already complete loads the final state and returns at once.
- **A checkpoint belongs to one run.** Resuming with a different ``OptimConfig`` (any field but
  ``log_every`` and ``checkpoint_every``), ``steps_per_epoch``, world size or set of trainable
  parameters would silently mix two schedules, so it is refused with an
  :class:`~gsclip_lib.errors.InputError` that names the differences and the file (delete it, or pick
  another ``checkpoint_dir``, to start afresh). A checkpoint cut short (a full disk) is refused the
  same way, in one line that names the file.
- **The caller's random state is left alone**: the run seeds its own generators and restores the
  caller's on the way out (:func:`seeded_generators`).
- **Frozen parameters stay bit-identical**: only ``requires_grad`` parameters reach the optimizer,
  and only they (with the buffers) are checkpointed.
- **A non-finite loss stops the run** with :class:`NonFiniteLossError` naming the step where it first
  appeared; the last checkpoint is left as it was. It is noticed at the next log row or checkpoint,
  not at once: the loop reads nothing back from the device between those (no ``.item()`` per step),
  so the steps in between run on, their results discarded.
- **Data-parallel under torchrun**: with a process group of more than one rank the model is wrapped
  in ``DistributedDataParallel``, so ``loss_fn`` receives the wrapper and must call it (its
  ``forward``): calling a method such as ``model.module.encode_image`` directly would bypass the
  gradient all-reduce. The loop checks at every epoch end that the replicas still agree and
  raises if they do not. Only rank 0 writes checkpoints; every rank reads them (a shared
  filesystem is assumed). ``OptimConfig.batch_size`` is per rank, as open_clip's ``--batch-size``.
"""

from __future__ import annotations

import contextlib
import math
import pickle
import random
import zipfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch
from torch import Tensor

from gsclip_lib import distributed
from gsclip_lib.atomic_files import save_torch
from gsclip_lib.errors import InputError, positive_int
from gsclip_lib.progress import progress_bar
from gsclip_lib.params import OptimConfig

CHECKPOINT_NAME = "last.pt"
CHECKPOINT_FORMAT = "gsclip-train-checkpoint"
CHECKPOINT_VERSION = 2  # 2: mid-epoch checkpoints (the log window is saved)
_RESUME_EXEMPT_FIELDS = ("log_every", "checkpoint_every")  # change what is logged or saved, not what is trained
_END = object()  # marks an exhausted batch iterator


@dataclass
class TrainResult:
    history: list[dict]  # one row per logged step: {"step", "epoch", "loss", "lr", ...extra metrics}
    # (rows every log_every steps and at each epoch's end; loss and metrics are means over the
    # row's steps and over ranks, "epoch" counts epochs done, "seconds" the training time so far)
    steps: int  # optimizer steps done in total (including those before a resume)
    seconds: float  # wall time of this call
    resumed_from_step: int  # 0 for a fresh start


class NonFiniteLossError(FloatingPointError):
    """The loss turned NaN or infinite; the message names the step."""


def cosine_with_warmup(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """The learning-rate factor of step ``s`` (0-based), open_clip's ``cosine_lr``: a linear warm-up
    ``(s + 1) / warmup_steps``, then ``(1 + cos(pi * progress)) / 2`` down to 0 at ``total_steps``."""
    warmup_steps = min(warmup_steps, total_steps)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        decay_steps = max(1, total_steps - warmup_steps)
        progress = min(1.0, (step - warmup_steps) / decay_steps)
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def excluded_from_weight_decay(name: str, parameter: Tensor) -> bool:
    """open_clip's rule: gains, biases (all 1-d), embeddings and the temperature are not decayed."""
    return parameter.ndim < 2 or "embedding" in name or "logit_scale" in name


def trainable_parameters(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    return [(name, p) for name, p in model.named_parameters() if p.requires_grad]


def make_optimizer(model: torch.nn.Module, config: OptimConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters, in two groups: decayed matrices, undecayed rest."""
    named = trainable_parameters(model)
    if not named:
        raise ValueError("the model has no trainable parameter (requires_grad=True)")
    decay = [p for n, p in named if not excluded_from_weight_decay(n, p)]
    no_decay = [p for n, p in named if excluded_from_weight_decay(n, p)]
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    # open_clip's AdamW settings for ViTs (beta2 0.98, eps 1e-6).
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=config.lr, betas=(0.9, 0.98), eps=1e-6)


def checkpoint_path(checkpoint_dir: str | Path) -> Path:
    return Path(checkpoint_dir) / CHECKPOINT_NAME


def train(
    model: torch.nn.Module,
    loss_fn: Callable[[torch.nn.Module, Any], tuple[Tensor, dict[str, Tensor | float]]],
    batches: Callable[[int, int], Iterable[Any]],  # (epoch, start) -> that epoch's batches from batch start on, this rank's
    steps_per_epoch: int,
    config: OptimConfig,
    checkpoint_dir: str | Path,
    *,
    description: str = "train",
    progress: bool = True,
    device: torch.device | str | None = None,
    after_step: Callable[[torch.nn.Module], None] | None = None,
    find_unused_parameters: bool = False,
) -> TrainResult:
    """Train ``model`` for ``config.epochs`` epochs of ``steps_per_epoch`` steps (see the module docstring).

    ``loss_fn(model, batch)`` returns the scalar loss and a dict of scalar metrics (tensors left on
    the device, or floats), logged as the mean
    over the ``log_every`` steps of a row and over ranks. ``batches(epoch, start)``
    (``epoch`` and ``start`` from 0) yields at least ``steps_per_epoch - start`` batches, the epoch's
    batch ``start`` first; later ones are not used. ``device`` (default: where the
    model's parameters are) is where the model is moved; moving batches is ``loss_fn``'s job.
    ``after_step(model)`` runs after every optimizer step on the unwrapped model (e.g. to clamp
    CLIP's temperature). ``find_unused_parameters`` is passed to DDP for models whose forward
    leaves some trainable parameters out.

    The random generators (Python's, numpy's, torch's) are seeded with ``config.seed + rank`` for the
    run and given back to the caller as they were.
    """
    positive_int(steps_per_epoch, "steps_per_epoch")
    started = time.perf_counter()
    if device is not None:
        model.to(device)
    rank = distributed.rank_and_world_size()[0]
    with seeded_generators(config.seed + rank):
        training = _Training(model, config, steps_per_epoch, checkpoint_path(checkpoint_dir), description,
                             find_unused_parameters)
        bar = progress_bar(total=training.total_steps, initial=training.run.step, desc=description,
                           disable=not (progress and rank == 0), unit="step")
        try:
            for epoch in range(training.run.epoch, config.epochs):
                training.run_epoch(epoch, batches(epoch, training.first_batch(epoch)), loss_fn, after_step, bar)
        finally:
            bar.close()
    return TrainResult(
        history=list(training.run.history),
        steps=training.run.step,
        seconds=time.perf_counter() - started,
        resumed_from_step=training.resumed_from_step,
    )


@contextlib.contextmanager
def seeded_generators(seed: int) -> Iterator[None]:
    """Python's, numpy's and torch's generators (every CUDA device's too) seeded with ``seed`` inside
    the block, and restored to their states before it on the way out."""
    before = _rng_state()
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    try:
        yield
    finally:
        _set_rng_state(before)


class _Training:
    """One call of :func:`train`: the model (wrapped in DDP when there are several ranks), its
    optimizer and schedule, the run's counters (resumed from the checkpoint when there is one) and the
    log row being filled."""

    def __init__(self, model: torch.nn.Module, config: OptimConfig, steps_per_epoch: int, path: Path,
                 description: str, find_unused_parameters: bool) -> None:
        self.model, self.config, self.steps_per_epoch = model, config, steps_per_epoch
        self.path, self.description = path, description
        self.rank, self.world_size = distributed.rank_and_world_size()
        self.total_steps = config.epochs * steps_per_epoch
        self.optimizer = make_optimizer(model, config)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, cosine_with_warmup(self.total_steps, config.warmup_steps))
        self.run = self.resume() if path.is_file() else _RunState()
        self.resumed_from_step = self.run.step
        self.wrapped = model
        if self.world_size > 1:
            device = distributed.model_device(model)
            self.wrapped = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None,
                find_unused_parameters=find_unused_parameters,
            )
        model.train()
        self.window = _LogWindow()
        self.window.load(self.run.window)
        self.nonfinite = _FirstNonFinite()

    def first_batch(self, epoch: int) -> int:
        """The epoch's first batch still to run: above 0 when resuming a mid-epoch checkpoint."""
        return self.run.step - epoch * self.steps_per_epoch

    def run_epoch(self, epoch: int, batches: Iterable[Any], loss_fn: Callable, after_step: Callable | None,
                  bar: Any) -> None:
        epoch_started = time.perf_counter()
        seconds_before = self.run.seconds
        iterator = iter(batches)
        for index in range(self.first_batch(epoch), self.steps_per_epoch):
            batch = next(iterator, _END)
            _check_batch_available(batch is not _END, self.description, epoch, index, self.steps_per_epoch,
                                   self.world_size)
            loss_value, metrics, grad_norm, lr = self.step(batch, loss_fn)
            if after_step is not None:
                after_step(self.model)
            self.run.seconds = seconds_before + time.perf_counter() - epoch_started
            last_of_epoch = index == self.steps_per_epoch - 1
            self.window.add(loss_value, metrics, grad_norm)
            every = self.config.checkpoint_every
            logs = self.run.step % self.config.log_every == 0 or last_of_epoch
            saves = last_of_epoch or bool(every and self.run.step % every == 0)
            if logs or saves:
                self.check_finite()
            # A row every log_every steps and at every epoch's end; a half-filled row is saved
            # with a mid-epoch checkpoint, so a resumed run logs exactly what an uninterrupted one does.
            if logs:
                row = self.window.row(self.run.step, self.run.step / self.steps_per_epoch, lr)
                row["seconds"] = round(self.run.seconds, 3)
                self.run.history.append(row)
                bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{lr:.2e}")
            bar.update(1)
            if last_of_epoch:
                self.run.epoch = epoch + 1
            if saves:
                self.save()

    def step(self, batch: Any, loss_fn: Callable) -> tuple[Tensor, dict[str, Any], Tensor | None, float]:
        """One optimizer step on ``batch``: ``(loss averaged over ranks, the loss function's metrics,
        gradient norm, learning rate)``, the tensors left on the device: nothing here waits for it."""
        loss, metrics = loss_fn(self.wrapped, batch)
        loss_value = distributed.all_reduce_mean(loss.detach().float())
        self.nonfinite.see(loss_value, self.run.step + 1)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = None
        if self.config.grad_clip > 0:
            parameters = [p for _, p in trainable_parameters(self.model)]
            grad_norm = torch.nn.utils.clip_grad_norm_(parameters, self.config.grad_clip)
        self.optimizer.step()
        lr = self.optimizer.param_groups[0]["lr"]  # the rate this step used
        self.scheduler.step()
        self.run.step += 1
        return loss_value, metrics, grad_norm, lr

    def check_finite(self) -> None:
        """Raise :class:`NonFiniteLossError` if a loss since the start turned NaN or infinite, naming
        the first such step; the last checkpoint is left as it was. Checked where the loop waits for
        the device anyway (a log row, a checkpoint), not at every step."""
        found = self.nonfinite.first()
        if found is None:
            return
        step, value = found
        epoch, batch = divmod(step - 1, self.steps_per_epoch)
        kept = (f"{self.path} holds the state after step {self.run.saved_step}" if self.run.saved_step
                else "no checkpoint written")
        raise NonFiniteLossError(
            f"{self.description}: the loss is {value} at step {step} of {self.total_steps} "
            f"(epoch {epoch + 1}, batch {batch + 1}); stopped, {kept}"
        )

    def save(self) -> None:
        """Check the replicas agree, then write the checkpoint (rank 0; every rank waits for it)."""
        _check_replicas_agree(self.model, self.description, self.run.step, self.world_size)
        self.run.window = self.window.state()
        rng_states = distributed.all_gather_objects(_rng_state())  # every rank's, so each resumes its own
        if self.rank == 0:
            save_torch(self.checkpoint(rng_states), self.path)
        distributed.barrier()  # nobody moves on (or resumes) before the file is complete
        self.run.saved_step = self.run.step

    def checkpoint(self, rng_states: list[dict[str, Any]]) -> dict[str, Any]:
        """What ``last.pt`` holds: enough to continue exactly where this run is."""
        run = self.run
        return {
            "format": CHECKPOINT_FORMAT,
            "version": CHECKPOINT_VERSION,
            "description": self.description,
            "optim_config": self.config.model_dump(),
            "steps_per_epoch": self.steps_per_epoch,
            "world_size": self.world_size,
            "step": run.step,
            "epoch": run.epoch,
            "seconds": run.seconds,
            "history": run.history,
            "log_window": run.window,
            "trainable": [name for name, _ in trainable_parameters(self.model)],
            "model": _trainable_state(self.model),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": rng_states,
        }

    def resume(self) -> _RunState:
        """The run's state from ``last.pt``, after checking that it belongs to this run; the model,
        optimizer, schedule and this rank's random generators are loaded from it."""
        checkpoint = load_checkpoint(self.path)
        differences = _differences(checkpoint, self.config, self.steps_per_epoch, self.world_size,
                                   [name for name, _ in trainable_parameters(self.model)])
        if differences:
            raise InputError(
                f"cannot resume from {self.path}: it belongs to another run ({'; '.join(differences)}). "
                f"Delete it, or choose another checkpoint_dir, to start afresh."
            )
        model = self.model
        incompatible = model.load_state_dict(checkpoint["model"], strict=False)
        frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
        missing = [key for key in incompatible.missing_keys if key not in frozen]
        if missing or incompatible.unexpected_keys:
            raise InputError(
                f"cannot resume from {self.path}: its model state does not fit the model "
                f"(missing {missing[:5]}, unexpected {incompatible.unexpected_keys[:5]})"
            )
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.scheduler.load_state_dict(checkpoint["scheduler"])
        _set_rng_state(checkpoint["rng"][self.rank])
        return _RunState(
            step=checkpoint["step"],
            epoch=checkpoint["epoch"],
            seconds=checkpoint.get("seconds", 0.0),
            history=list(checkpoint["history"]),
            window=dict(checkpoint.get("log_window") or {}),
            saved_step=checkpoint["step"],
        )


# ----------------------------------------------------------------------------------------------
# Internals


@dataclass
class _RunState:
    step: int = 0  # optimizer steps done
    epoch: int = 0  # epochs completed
    seconds: float = 0.0  # training time up to ``step``, over all calls
    history: list[dict] = field(default_factory=list)
    window: dict = field(default_factory=dict)  # the log row being filled when the checkpoint was written
    saved_step: int = 0  # the step of the last checkpoint on disk


class _LogWindow:
    """Sums of the loss and metrics since the last history row; reduced over ranks when a row is made.

    The sums stay on the device as float64 tensors (the same sums as Python floats of the float32
    values, bit for bit) until a row or a checkpoint reads them.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.count = 0
        self.loss: float | Tensor = 0.0  # already the mean over ranks, step by step
        self.metrics: dict[str, float | Tensor] = {}
        self.grad_norm: float | Tensor = 0.0

    def state(self) -> dict:
        return {"count": self.count, "loss": float(self.loss),
                "metrics": {name: float(value) for name, value in self.metrics.items()},
                "grad_norm": float(self.grad_norm)}

    def load(self, state: dict) -> None:
        if state:
            self.count, self.loss, self.grad_norm = state["count"], state["loss"], state["grad_norm"]
            self.metrics = dict(state["metrics"])

    def add(self, loss: Tensor, metrics: dict[str, Any], grad_norm: Tensor | None) -> None:
        self.count += 1
        self.loss = self.loss + loss.double()
        for name, value in metrics.items():
            self.metrics[name] = self.metrics.get(name, 0.0) + torch.as_tensor(value).detach().double()
        if grad_norm is not None:
            self.grad_norm = self.grad_norm + grad_norm.detach().double()

    def row(self, step: int, epoch: float, lr: float) -> dict:
        names = sorted(self.metrics)
        local = torch.tensor([float(self.metrics[name]) for name in names], dtype=torch.float64)
        if names and distributed.process_group_size() > 1:
            local = distributed.all_reduce_mean(local.to(distributed.collective_device())).cpu()
        row = {"step": step, "epoch": round(epoch, 4), "loss": float(self.loss) / self.count, "lr": lr}
        if float(self.grad_norm):
            row["grad_norm"] = float(self.grad_norm) / self.count
        row.update({name: value / self.count for name, value in zip(names, local.tolist())})
        self.reset()
        return row


class _FirstNonFinite:
    """The first step whose loss was not finite, and that loss, kept on the device step by step."""

    def __init__(self) -> None:
        self.step: Tensor | None = None  # 0 while every loss was finite
        self.value: Tensor | None = None

    def see(self, loss: Tensor, step: int) -> None:
        if self.step is None:
            self.step = torch.zeros((), dtype=torch.int64, device=loss.device)
            self.value = torch.zeros((), dtype=loss.dtype, device=loss.device)
        first = (self.step == 0) & ~torch.isfinite(loss)
        self.step = torch.where(first, torch.full_like(self.step, step), self.step)
        self.value = torch.where(first, loss, self.value)

    def first(self) -> tuple[int, float] | None:
        if self.step is None or int(self.step) == 0:
            return None
        return int(self.step), float(self.value)


def _check_batch_available(
    available: bool, description: str, epoch: int, index: int, steps_per_epoch: int, world_size: int
) -> None:
    # Under DDP every rank must run every step, or the others wait forever in the all-reduce:
    # agree on the answer first, then all ranks raise together.
    everywhere = available
    if world_size > 1:
        everywhere = bool(distributed.all_reduce_min(int(available)))
    if not everywhere:
        who = "this rank's" if not available else "another rank's"
        raise ValueError(
            f"{description}: {who} batches(epoch={epoch}) ran out after {index} batches; "
            f"steps_per_epoch={steps_per_epoch} needs at least that many on every rank"
        )


def _rng_state() -> dict[str, Any]:
    kind, keys, position, has_gauss, cached = np.random.get_state()
    return {
        "python": random.getstate(),
        # numpy's state as plain numbers: checkpoints load with torch.load(weights_only=True)
        "numpy": [kind, [int(k) for k in keys], int(position), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(_as_tuple(state["python"]))
    kind, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), position, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(value: Any) -> Any:
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


def _trainable_state(model: torch.nn.Module) -> dict[str, Tensor]:
    """Trainable parameters and all (persistent) buffers: what training changes. Frozen parameters
    are left out, so a frozen backbone costs nothing in the checkpoint."""
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items() if name not in frozen}


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """A training checkpoint (``last.pt``) as saved by :func:`train`, tensors on the CPU."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"training checkpoint not found: {path}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError, zipfile.BadZipFile) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise InputError(
            f"{path} cannot be read as a training checkpoint: it is cut short or corrupt ({reason}). "
            "Delete it to start this training stage afresh"
        ) from error
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise InputError(f"{path} is not a training checkpoint written by gsclip_lib.training.loop.train")
    if checkpoint.get("version") != CHECKPOINT_VERSION:
        raise InputError(
            f"{path} is a training checkpoint of format version {checkpoint.get('version')}, this code reads "
            f"version {CHECKPOINT_VERSION}: delete it to start afresh"
        )
    return checkpoint


def _differences(checkpoint: dict[str, Any], config: OptimConfig, steps_per_epoch: int, world_size: int,
                 trainable: list[str]) -> list[str]:
    """How the run that wrote ``checkpoint`` differs from this one, in words (empty: the same run)."""
    differences = []
    saved = checkpoint["optim_config"]
    for name, value in config.model_dump().items():
        if name not in _RESUME_EXEMPT_FIELDS and saved.get(name) != value:
            differences.append(f"{name}: {saved.get(name)!r} in the checkpoint, {value!r} now")
    if checkpoint["steps_per_epoch"] != steps_per_epoch:
        differences.append(f"steps_per_epoch: {checkpoint['steps_per_epoch']} in the checkpoint, {steps_per_epoch} now")
    if checkpoint["world_size"] != world_size:
        differences.append(f"world_size: {checkpoint['world_size']} in the checkpoint, {world_size} now")
    if checkpoint["trainable"] != trainable:
        differences.append(
            f"trainable parameters: {len(checkpoint['trainable'])} in the checkpoint, {len(trainable)} now "
            f"(first difference: {_first_difference(checkpoint['trainable'], trainable)})"
        )
    return differences


def _first_difference(a: list[str], b: list[str]) -> str:
    for x, y in zip(a, b):
        if x != y:
            return f"{x!r} vs {y!r}"
    return f"{len(a)} vs {len(b)} names"


def _check_replicas_agree(model: torch.nn.Module, description: str, step: int, world_size: int) -> None:
    """Under DDP, raise unless every rank holds the same trainable parameters (a cheap checksum)."""
    if world_size == 1:
        return
    with torch.no_grad():
        checksum = sum(
            (p.detach().double().sum() + (p.detach().double() ** 2).sum()) for _, p in trainable_parameters(model)
        )
    low = distributed.all_reduce_min(float(checksum))
    high = -distributed.all_reduce_min(-float(checksum))
    if low != high:
        raise RuntimeError(
            f"{description}: the ranks' parameters differ after step {step} (checksums {low} to {high}). "
            "Gradients were not averaged: loss_fn must call the model it receives (DDP's forward), "
            "not a method of model.module."
        )
