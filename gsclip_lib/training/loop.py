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
  ``log_every`` and ``checkpoint_every``), ``steps_per_epoch``, world size or set of trainable parameters would silently
  mix two schedules, so it is refused with a ``ValueError`` that names the differences and the file
  (delete it, or pick another ``checkpoint_dir``, to start afresh).
- **Frozen parameters stay bit-identical**: only ``requires_grad`` parameters reach the optimizer,
  and only they (with the buffers) are checkpointed.
- **A non-finite loss stops the run** with :class:`NonFiniteLossError` naming the step; the last
  checkpoint is left as it was.
- **Data-parallel under torchrun**: with a process group of more than one rank the model is wrapped
  in ``DistributedDataParallel``, so ``loss_fn`` receives the wrapper and must call it (its
  ``forward``): calling a method such as ``model.module.encode_image`` directly would bypass the
  gradient all-reduce. The loop checks at every epoch end that the replicas still agree and
  raises if they do not. Only rank 0 writes checkpoints; every rank reads them (a shared
  filesystem is assumed). ``OptimConfig.batch_size`` is per rank, as open_clip's ``--batch-size``.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch
from torch import Tensor

from gsclip_lib import distributed
from gsclip_lib.atomic_files import save_torch
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
    loss_fn: Callable[[torch.nn.Module, Any], tuple[Tensor, dict[str, float]]],
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

    ``loss_fn(model, batch)`` returns the scalar loss and a dict of float metrics, logged as the mean
    over the ``log_every`` steps of a row and over ranks. ``batches(epoch, start)``
    (``epoch`` and ``start`` from 0) yields at least ``steps_per_epoch - start`` batches, the epoch's
    batch ``start`` first; later ones are not used. ``device`` (default: where the
    model's parameters are) is where the model is moved; moving batches is ``loss_fn``'s job.
    ``after_step(model)`` runs after every optimizer step on the unwrapped model (e.g. to clamp
    CLIP's temperature). ``find_unused_parameters`` is passed to DDP for models whose forward
    leaves some trainable parameters out.
    """
    if isinstance(steps_per_epoch, bool) or not isinstance(steps_per_epoch, int) or steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch must be a positive integer, got {steps_per_epoch!r}")
    started = time.perf_counter()
    rank, world_size = distributed.rank_and_world_size()
    if device is not None:
        model.to(device)
    device = _model_device(model)
    total_steps = config.epochs * steps_per_epoch
    path = checkpoint_path(checkpoint_dir)

    optimizer = make_optimizer(model, config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_with_warmup(total_steps, config.warmup_steps))
    _seed_everything(config.seed + rank)
    run = _RunState()
    if path.is_file():
        run = _resume(path, model, optimizer, scheduler, config, steps_per_epoch, world_size, rank)
    resumed_from_step = run.step

    wrapped = model
    if world_size > 1:
        wrapped = torch.nn.parallel.DistributedDataParallel(
            model,
            device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=find_unused_parameters,
        )
    model.train()
    bar = progress_bar(
        total=total_steps, initial=run.step, desc=description, disable=not (progress and rank == 0), unit="step"
    )
    window = _LogWindow()
    window.load(run.window)
    every = config.checkpoint_every
    try:
        for epoch in range(run.epoch, config.epochs):
            epoch_started = time.perf_counter()
            start = run.step - epoch * steps_per_epoch  # > 0 when resuming a mid-epoch checkpoint
            seconds_before = run.seconds
            iterator = iter(batches(epoch, start))
            for index in range(start, steps_per_epoch):
                batch = next(iterator, _END)
                _check_batch_available(batch is not _END, description, epoch, index, steps_per_epoch, world_size)
                loss, metrics = loss_fn(wrapped, batch)
                loss_value = distributed.all_reduce_mean(loss.detach().float()).item()
                if not math.isfinite(loss_value):
                    kept = f"{path} holds the state after step {run.saved_step}" if run.saved_step else "no checkpoint written"
                    raise NonFiniteLossError(
                        f"{description}: the loss is {loss_value} at step {run.step + 1} of {total_steps} "
                        f"(epoch {epoch + 1}, batch {index + 1}); stopped, {kept}"
                    )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                grad_norm = None
                if config.grad_clip > 0:
                    grad_norm = torch.nn.utils.clip_grad_norm_(
                        [p for _, p in trainable_parameters(model)], config.grad_clip
                    ).item()
                optimizer.step()
                lr = optimizer.param_groups[0]["lr"]  # the rate this step used
                scheduler.step()
                run.step += 1
                if after_step is not None:
                    after_step(model)
                window.add(loss_value, metrics, grad_norm)
                run.seconds = seconds_before + time.perf_counter() - epoch_started
                # A row every log_every steps and at every epoch's end; a half-filled row is saved
                # with a mid-epoch checkpoint, so a resumed run logs exactly what an uninterrupted one does.
                if run.step % config.log_every == 0 or index == steps_per_epoch - 1:
                    row = window.row(run.step, run.step / steps_per_epoch, lr)
                    row["seconds"] = round(run.seconds, 3)
                    run.history.append(row)
                    bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{lr:.2e}")
                bar.update(1)
                if index == steps_per_epoch - 1:
                    run.epoch = epoch + 1
                if index == steps_per_epoch - 1 or (every and run.step % every == 0):
                    _check_replicas_agree(model, description, run.step, world_size)
                    run.window = window.state()
                    _save_checkpoint(path, model, optimizer, scheduler, config, steps_per_epoch, world_size, rank,
                                     run, description)
                    run.saved_step = run.step
    finally:
        bar.close()
    return TrainResult(
        history=list(run.history),
        steps=run.step,
        seconds=time.perf_counter() - started,
        resumed_from_step=resumed_from_step,
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
    """Sums of the loss and metrics since the last history row; reduced over ranks when a row is made."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.count = 0
        self.loss = 0.0  # already the mean over ranks, step by step
        self.metrics: dict[str, float] = {}
        self.grad_norm = 0.0

    def state(self) -> dict:
        return {"count": self.count, "loss": self.loss, "metrics": dict(self.metrics), "grad_norm": self.grad_norm}

    def load(self, state: dict) -> None:
        if state:
            self.count, self.loss, self.grad_norm = state["count"], state["loss"], state["grad_norm"]
            self.metrics = dict(state["metrics"])

    def add(self, loss: float, metrics: dict[str, float], grad_norm: float | None) -> None:
        self.count += 1
        self.loss += loss
        for name, value in metrics.items():
            self.metrics[name] = self.metrics.get(name, 0.0) + float(value)
        if grad_norm is not None:
            self.grad_norm += grad_norm

    def row(self, step: int, epoch: float, lr: float) -> dict:
        names = sorted(self.metrics)
        local = torch.tensor([self.metrics[name] for name in names], dtype=torch.float64)
        if names and distributed.rank_and_world_size()[1] > 1:
            local = distributed.all_reduce_mean(local.to(distributed.collective_device())).cpu()
        row = {"step": step, "epoch": round(epoch, 4), "loss": self.loss / self.count, "lr": lr}
        if self.grad_norm:
            row["grad_norm"] = self.grad_norm / self.count
        row.update({name: value / self.count for name, value in zip(names, local.tolist())})
        self.reset()
        return row


def _model_device(model: torch.nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    return torch.device("cpu")


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


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


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


def _save_checkpoint(
    path: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    config: OptimConfig,
    steps_per_epoch: int,
    world_size: int,
    rank: int,
    run: _RunState,
    description: str,
) -> None:
    rng_states = distributed.all_gather_objects(_rng_state())  # every rank's, so each resumes its own
    if rank == 0:
        checkpoint = {
            "format": CHECKPOINT_FORMAT,
            "version": CHECKPOINT_VERSION,
            "description": description,
            "optim_config": config.model_dump(),
            "steps_per_epoch": steps_per_epoch,
            "world_size": world_size,
            "step": run.step,
            "epoch": run.epoch,
            "seconds": run.seconds,
            "history": run.history,
            "log_window": run.window,
            "trainable": [name for name, _ in trainable_parameters(model)],
            "model": _trainable_state(model),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": rng_states,
        }
        save_torch(checkpoint, path)
    distributed.barrier()  # nobody moves on (or resumes) before the file is complete


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """A training checkpoint (``last.pt``) as saved by :func:`train`, tensors on the CPU."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"training checkpoint not found: {path}")
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a training checkpoint written by gsclip_lib.training.loop.train")
    if checkpoint.get("version") != CHECKPOINT_VERSION:
        raise ValueError(
            f"{path} is a training checkpoint of format version {checkpoint.get('version')}, this code reads "
            f"version {CHECKPOINT_VERSION}: delete it to start afresh"
        )
    return checkpoint


def _resume(
    path: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    config: OptimConfig,
    steps_per_epoch: int,
    world_size: int,
    rank: int,
) -> _RunState:
    checkpoint = load_checkpoint(path)
    differences = []
    saved = checkpoint["optim_config"]
    for name, value in config.model_dump().items():
        if name not in _RESUME_EXEMPT_FIELDS and saved.get(name) != value:
            differences.append(f"{name}: {saved.get(name)!r} in the checkpoint, {value!r} now")
    if checkpoint["steps_per_epoch"] != steps_per_epoch:
        differences.append(f"steps_per_epoch: {checkpoint['steps_per_epoch']} in the checkpoint, {steps_per_epoch} now")
    if checkpoint["world_size"] != world_size:
        differences.append(f"world_size: {checkpoint['world_size']} in the checkpoint, {world_size} now")
    names = [name for name, _ in trainable_parameters(model)]
    if checkpoint["trainable"] != names:
        differences.append(
            f"trainable parameters: {len(checkpoint['trainable'])} in the checkpoint, {len(names)} now "
            f"(first difference: {_first_difference(checkpoint['trainable'], names)})"
        )
    if differences:
        raise ValueError(
            f"cannot resume from {path}: it belongs to another run ({'; '.join(differences)}). "
            f"Delete it, or choose another checkpoint_dir, to start afresh."
        )
    incompatible = model.load_state_dict(checkpoint["model"], strict=False)
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    missing = [key for key in incompatible.missing_keys if key not in frozen]
    if missing or incompatible.unexpected_keys:
        raise ValueError(
            f"cannot resume from {path}: its model state does not fit the model "
            f"(missing {missing[:5]}, unexpected {incompatible.unexpected_keys[:5]})"
        )
    optimizer.load_state_dict(checkpoint["optimizer"])
    scheduler.load_state_dict(checkpoint["scheduler"])
    _set_rng_state(checkpoint["rng"][rank])
    return _RunState(
        step=checkpoint["step"],
        epoch=checkpoint["epoch"],
        seconds=checkpoint.get("seconds", 0.0),
        history=list(checkpoint["history"]),
        window=dict(checkpoint.get("log_window") or {}),
        saved_step=checkpoint["step"],
    )


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
