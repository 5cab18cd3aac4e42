"""One training loop for every method in this repository.

Fast path on CUDA: data resident on the GPU (``data.GpuLoader``), bf16 autocast, channels_last,
large batches. The learning rate is a pure function of the step, so resuming needs no scheduler
state and a callback may swap the model or optimiser mid-run (CUP-SS rebuilds both when it prunes).
Pruning masks, quantizers and CUP-SS hook in through ``Callback``.

Under torchrun (a process group initialised, ``distributed.init_distributed``) the same loop runs
data-parallel: each rank's loss is the mean over its own batch, DistributedDataParallel averages
the gradients, so one step is one step of the global batch (world size × per-rank batch). Only
rank 0 shows progress and writes checkpoints; every rank returns the same history.
"""
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn as nn
from tqdm import tqdm

from . import attacks, checkpoints, distributed, sam
from .accuracy import evaluate
from .graphs import TrainingForward
from .objectives import WithMaps, mixup, needs_maps, objective
from .precision import autocast


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 100
    lr: float = 0.1                     # peak learning rate
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    decay_bn_and_bias: bool = True      # False: no weight decay on 1-D parameters (BN, biases)
    schedule: str = "onecycle"          # onecycle | cosine | step | constant
    warmup: float = 0.15                # fraction of steps spent warming up (onecycle, cosine)
    hold: float = 0.0                   # fraction of steps then held at the peak before decaying
    milestones: tuple = ()              # epochs at which 'step' multiplies the lr by gamma
    gamma: float = 0.1
    label_smoothing: float = 0.0
    eval_every: int = 1                 # evaluate on the test loader every n epochs (0: only at the end)
    checkpoint_every: int = 10          # epochs between resumable checkpoints (when a path is given)
    seed: int = 0
    compile: str | None = None          # torch.compile mode for the training forward and training-time PGD (CUDA only)
    amp: bool = True                    # bf16 autocast on CUDA; False trains in float32 (tight run comparisons)
    # Run the training forward in this many equal parts, each with its own BatchNorm batch statistics:
    # what DDP (or DataParallel, the paper's) over that many GPUs computes, so one process can
    # reproduce a multi-GPU run step for step. Running statistics follow the first part, as DDP
    # keeps rank 0's. Single process only.
    bn_splits: int = 1
    # Knowledge distillation from a teacher passed to ``fit`` (not in ElasticTrain; spec §5.8 lists it
    # as an extension): loss = (1 - alpha)·CE + alpha·T²·KL(teacher_T || student_T); with adversarial
    # training, in the clean term only (``objective``).
    distill_alpha: float = 0.0
    distill_temperature: float = 4.0
    # Attention transfer with that teacher (Zagoruyko & Komodakis 2017, not in ElasticTrain): + attention_beta/2
    # · Σ mean((a_s − a_t)²) over the maps entering VGG16's first three max-pools (32², 16², 8²), a = each
    # image's normalised channel mean of f² (``objectives.attention_transfer``; their β: 1e3). Hints inside
    # the network for a student too sparse to fit its own training images (1000×: 92.6%), which logit
    # distillation reaches only through the last layer.
    attention_beta: float = 0.0
    # Mixup (Zhang et al. 2018, not in ElasticTrain): x <- lam·x + (1 - lam)·x[perm], one lam ~ Beta(mixup,
    # mixup) per batch, the cross-entropy mixed alike. With a teacher, the teacher labels the same mixed
    # image ("function matching", Beyer et al. 2022): a student far smaller than its teacher (1000x) then
    # learns the teacher's function between the training images too, where plain distillation never asks.
    mixup: float = 0.0
    # Adversarial training (spec §5.9, DNR's hybrid loss): loss = beta·CE(x) + (1 - beta)·CE(PGD(x)),
    # PGD on [0, 1] inputs with a random start. beta = 1: clean only. The attack's BatchNorm: "eval"
    # (running statistics, as ModelEval attacks) or "batch" (the attacked batch's own, spec §5.9's option).
    adversarial_beta: float = 1.0
    adv_eps: float = 8 / 255
    adv_steps: int = 7
    adv_step_size: float = 0.01
    adv_attack_bn: str = "eval"
    # BatchNorm statistics of the training forward on [clean; adversarial]: "mixed" (the whole batch's)
    # or "clean" (the clean half's, applied to both halves: ``attacks.use_clean_statistics``).
    adv_bn_stats: str = "mixed"
    # Sharpness-aware minimisation (Foret et al. 2021, not in ElasticTrain; ``sam``): the step's gradient
    # is taken again at w + sam_rho·g/‖g‖ over the non-zero weights. 0: off. At least doubles a plain
    # step's cost (3.8x for compiled ResNet-56, ``sam``); the attack is not repeated: ~1.3x an adversarial step.
    sam_rho: float = 0.0

    def __post_init__(self):
        if self.schedule not in ("onecycle", "cosine", "step", "constant"):
            raise ValueError(f"schedule must be onecycle, cosine, step or constant, not {self.schedule!r}")
        if self.epochs < 1 or self.lr <= 0 or not 0 <= self.warmup or not self.warmup + self.hold < 1:
            raise ValueError(f"need epochs >= 1, lr > 0 and 0 <= warmup, warmup + hold < 1 (got "
                             f"{self.epochs}, {self.lr}, {self.warmup}, {self.hold})")
        if not 0 <= self.adversarial_beta <= 1 or self.adv_eps < 0 or self.adv_steps < 1 or self.adv_step_size <= 0:
            raise ValueError(f"need 0 <= adversarial_beta <= 1, adv_eps >= 0, adv_steps >= 1 and adv_step_size > 0 "
                             f"(got {self.adversarial_beta}, {self.adv_eps}, {self.adv_steps}, {self.adv_step_size})")
        if self.adv_bn_stats not in ("mixed", "clean") or (self.adv_bn_stats == "clean" and self.adversarial_beta == 1):
            raise ValueError(f"adv_bn_stats must be 'mixed' or 'clean', and 'clean' needs adversarial training "
                             f"(adversarial_beta < 1); got {self.adv_bn_stats!r} with beta {self.adversarial_beta}")
        if self.adv_attack_bn not in attacks.ATTACK_BN:
            raise ValueError(f"adv_attack_bn must be one of {attacks.ATTACK_BN}, not {self.adv_attack_bn!r}")
        if self.bn_splits < 1 or (self.bn_splits > 1 and self.adversarial_beta < 1):
            raise ValueError(f"bn_splits must be >= 1, and 1 with adversarial training (got {self.bn_splits})")
        if self.mixup < 0 or (self.mixup > 0 and self.adversarial_beta < 1):
            raise ValueError(f"mixup must be >= 0 and 0 with adversarial training, whose attack needs the "
                             f"image's own label (got mixup {self.mixup}, beta {self.adversarial_beta})")
        if self.sam_rho < 0:
            raise ValueError(f"sam_rho must be >= 0 (0: no SAM), got {self.sam_rho}")
        if not 0 <= self.distill_alpha <= 1 or self.distill_temperature <= 0:
            raise ValueError(f"need 0 <= distill_alpha <= 1 and distill_temperature > 0 (got "
                             f"{self.distill_alpha}, {self.distill_temperature})")
        if self.attention_beta < 0 or (self.attention_beta > 0 and (
                self.distill_alpha == 0 or self.adversarial_beta < 1 or self.bn_splits > 1)):
            raise ValueError(f"attention_beta must be >= 0, and attention transfer needs the teacher (distill_alpha > 0) "
                             f"on clean, unsplit batches (adversarial_beta 1, bn_splits 1); got attention_beta "
                             f"{self.attention_beta}, distill_alpha {self.distill_alpha}, adversarial_beta "
                             f"{self.adversarial_beta}, bn_splits {self.bn_splits}")

    def lr_at(self, step: int, steps_per_epoch: int) -> float:
        total = self.epochs * steps_per_epoch
        t = step / total
        if self.schedule == "step":
            return self.lr * self.gamma ** sum(step // steps_per_epoch >= m for m in self.milestones)
        if self.schedule == "constant":
            return self.lr
        if t < self.warmup:  # linear warm-up from lr/25, as torch's OneCycleLR does
            return self.lr * (0.04 + 0.96 * t / self.warmup)
        if t < self.warmup + self.hold:  # e.g. constant while a pruning ramp runs (spec §6)
            return self.lr
        u = (t - self.warmup - self.hold) / (1 - self.warmup - self.hold)
        return self.lr * (1 - u) if self.schedule == "onecycle" else self.lr * 0.5 * (1 + math.cos(math.pi * u))


class Callback:
    """Hooks into ``fit``. ``state`` is the live ``TrainState``: a callback may replace
    ``state.model`` or ``state.optimizer`` (call ``state.rebuild_optimizer()``)."""

    def on_train_begin(self, state): ...
    def before_epoch(self, state): ...
    def after_step(self, state): ...
    def after_epoch(self, state): ...
    def on_train_end(self, state): ...
    def state_dict(self) -> dict: return {}
    def load_state_dict(self, d: dict): ...


@dataclass
class TrainState:
    model: nn.Module
    optimizer: torch.optim.Optimizer
    config: TrainConfig
    device: torch.device
    epoch: int = 0           # epochs completed
    step: int = 0            # optimiser steps completed
    history: list = field(default_factory=list)
    loss: torch.Tensor | None = None   # the last step's loss over this rank's batch, detached (for callbacks)
    metrics: dict = field(default_factory=dict)   # callbacks add per-epoch columns here
    # A callback that keeps changing the architecture (CUP-SS while pruning) sets this so the
    # epoch runs eager: recompiling (CUDA graphs) every epoch would cost more than it saves.
    defer_compile: bool = False
    train_loader: object = None  # what fit iterates (a callback's BN recalibration reads it)
    # Training PGD's random starts and mixup's draws: generators of their own, saved with the checkpoint,
    # so a resumed run draws what the uninterrupted one would have (the global stream is not saved).
    attack_rng: torch.Generator | None = None
    mix_rng: np.random.Generator | None = None

    def rebuild_optimizer(self):
        self.optimizer = make_optimizer(self.model, self.config)


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.SGD:
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 and not cfg.decay_bn_and_bias else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def prepare_model(model: nn.Module, device) -> nn.Module:
    model = model.to(device)
    if torch.device(device).type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return model


def fit(model: nn.Module, train_loader, test_loader, config: TrainConfig, *, callbacks=(),
        device=None, checkpoint_path=None, progress=True, teacher: nn.Module | None = None
        ) -> tuple[nn.Module, pd.DataFrame]:
    """Train ``model`` and return ``(model, history)``; history has one row per epoch.

    With ``checkpoint_path``, a resumable checkpoint is written atomically every
    ``config.checkpoint_every`` epochs and at the end, and an existing one is resumed from.
    The returned model is the one after the final epoch (never a best-epoch pick).
    A loader with ``set_epoch`` is told the epoch before it is iterated (``imagenet.FolderLoader``).
    """
    device = torch.device(device or default_device())
    torch.manual_seed(config.seed)
    if device.type == "cuda":  # autotuned kernels, unless the caller asked for deterministic ones
        torch.backends.cudnn.benchmark = not torch.backends.cudnn.deterministic
    model = prepare_model(model, device)
    state = TrainState(model, make_optimizer(model, config), config, device, train_loader=train_loader,
                       attack_rng=torch.Generator(device).manual_seed(config.seed)
                       if config.adversarial_beta < 1 else None,
                       mix_rng=np.random.default_rng(config.seed) if config.mixup > 0 else None)
    if checkpoint_path and Path(checkpoint_path).exists():
        _resume(state, checkpoint_path, callbacks, train_loader)
    else:
        for cb in callbacks:
            cb.on_train_begin(state)
    steps_per_epoch = len(train_loader)
    if steps_per_epoch == 0:
        raise ValueError("the training loader yields no batch: the split is smaller than one batch "
                         "(lower the batch size or use more training images)")
    if (teacher is None) != (config.distill_alpha == 0):
        raise ValueError("distillation needs both a teacher and distill_alpha > 0 (got "
                         f"teacher={'a model' if teacher is not None else None}, alpha={config.distill_alpha})")
    if teacher is not None:
        teacher = prepare_model(teacher, device).eval().requires_grad_(False)
        if config.attention_beta > 0:  # the student is checked where its WithMaps is built, before any step
            needs_maps(teacher, "teacher")
    parallel = distributed.is_distributed()
    if parallel and config.bn_splits > 1:
        raise ValueError("bn_splits stands in for several GPUs in one process; under torchrun every rank "
                         "already normalises its own batch")
    # While a callback changes the architecture each epoch (CUP-SS), the forward is CUDA-graphed
    # per epoch instead of compiled (``graphs``); not for PGD's concatenated batch, split batches or maps.
    mode = config.compile if device.type == "cuda" else None
    train_forward = TrainingForward(mode, ddp=parallel, amp=config.amp,
                                    graph_when_deferred=config.bn_splits == 1 and config.adversarial_beta == 1
                                    and config.attention_beta == 0)
    tapped = None  # WithMaps(state.model) under attention transfer, rebuilt only if a callback swaps the model
    # Training-time PGD differentiates its own compiled copy (frozen weights, its own BatchNorm mode: other
    # graphs than the training forward's); every rank attacks its own batch, so no DDP there.
    attack_forward = TrainingForward(mode)
    bar = tqdm(range(state.epoch, config.epochs), initial=state.epoch, total=config.epochs,
               disable=not progress or not distributed.is_main(), file=sys.stdout, mininterval=5.0, desc="epochs")
    synced = None  # the model whose weights the ranks last made identical
    for _ in bar:
        state.metrics = {}
        for cb in callbacks:
            cb.before_epoch(state)
        if config.adv_bn_stats == "clean":  # each epoch: a callback may have swapped the model
            attacks.use_clean_statistics(state.model)
        distributed.sync_model(state.model, rebuilt=state.model is not synced)
        synced = state.model
        if hasattr(train_loader, "set_epoch"):
            train_loader.set_epoch(state.epoch)
        t0 = time.perf_counter()
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.int64)
        seen = 0
        state.model.train()
        for x, y in train_loader:
            lr = config.lr_at(state.step, steps_per_epoch)
            for g in state.optimizer.param_groups:
                g["lr"] = lr
            mix = None
            if config.mixup > 0:
                x, mix = mixup(x, config.mixup, state.mix_rng)
            if config.adversarial_beta < 1:
                # Generated before the training forward, which then sees one concatenated batch
                # (pgd gives the model back in train mode).
                x_adv = attacks.pgd(state.model, x, y, eps=config.adv_eps, step_size=config.adv_step_size,
                                    steps=config.adv_steps, bn=config.adv_attack_bn, generator=state.attack_rng,
                                    forward=attack_forward(state.model, eager=state.defer_compile))
            def batch_loss():
                nonlocal tapped
                with autocast(device, config.amp):
                    maps = None
                    if config.attention_beta > 0:
                        if tapped is None or tapped.model is not state.model:
                            tapped = WithMaps(state.model)
                        (out, maps), out_adv = train_forward(tapped, eager=state.defer_compile)(x), None
                    else:
                        forward = train_forward(state.model, eager=state.defer_compile)
                        if config.adversarial_beta < 1:
                            out, out_adv = forward(torch.cat([x, x_adv])).chunk(2)
                        else:
                            out, out_adv = _split_forward(forward, state.model, x, config.bn_splits), None
                    return objective(out, out_adv, y, x, teacher, config, mix, maps), out

            loss, out = batch_loss()
            state.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            # Counted now: a second graphed forward may overwrite ``out``'s memory.
            correct += (out.argmax(1) == y).sum()
            if config.sam_rho > 0:  # the same batch (and attack, and mix) at the perturbed weights
                with sam.perturbed(state.model, config.sam_rho):
                    second, _ = batch_loss()
                    state.optimizer.zero_grad(set_to_none=True)
                    second.backward()
            state.optimizer.step()
            state.step += 1
            state.loss = loss.detach()
            for cb in callbacks:
                cb.after_step(state)
            # Accumulate on the device: a .item() per step would sync and stall the GPU.
            loss_sum += loss.detach() * len(y)
            seen += len(y)
        state.epoch += 1
        # Every rank records the global figures; BatchNorm running statistics become rank 0's, which
        # DDP would use in the next forward anyway, so every rank evaluates and saves the same model.
        loss_total, correct_total, seen = distributed.all_reduce_sum([loss_sum.item(), correct.item(), seen])
        distributed.broadcast_state(state.model, buffers_only=True)
        row = {"epoch": state.epoch, "lr": lr, "train_loss": loss_total / seen,
               "train_acc": 100.0 * correct_total / seen}
        if device.type == "cuda":
            torch.cuda.synchronize()
        row["epoch_time_s"] = time.perf_counter() - t0
        last = state.epoch == config.epochs
        if test_loader is not None and (last or (config.eval_every and state.epoch % config.eval_every == 0)):
            row.update({f"test_{k}": v for k, v in evaluate(state.model, test_loader, amp=config.amp).items()
                        if k in ("top1", "loss")})
        for cb in callbacks:
            cb.after_epoch(state)
        row.update(state.metrics)
        state.history.append(row)
        bar.set_postfix({k: f"{v:.3g}" for k, v in row.items() if k in ("train_loss", "test_top1")})
        if checkpoint_path and (last or state.epoch % config.checkpoint_every == 0):
            if distributed.is_main():
                _save(state, checkpoint_path, callbacks, train_loader)
            distributed.barrier()  # no rank runs ahead (or resumes) before the file is complete
    if config.adv_bn_stats == "clean":
        attacks.use_clean_statistics(state.model, on=False)
    for cb in callbacks:
        cb.on_train_end(state)
    return state.model, pd.DataFrame(state.history)


def _split_forward(forward, model, x, splits: int):
    """``forward(x)`` in ``splits`` equal parts (``TrainConfig.bn_splits``), concatenated. The
    parts after the first run with BatchNorm momentum 0, so they leave the running statistics alone."""
    if splits == 1:
        return forward(x)
    if len(x) % splits:
        raise ValueError(f"bn_splits={splits} needs batches that split evenly, got one of {len(x)}")
    parts = x.chunk(splits)
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in bns]
    outs = [forward(parts[0])]
    try:
        for m in bns:
            m.momentum = 0.0
        outs += [forward(p) for p in parts[1:]]
    finally:
        for m, momentum in zip(bns, momenta):
            m.momentum = momentum
    return torch.cat(outs)


def _save(state, path, callbacks, loader):
    # The loader's generator state makes a resumed run draw the shuffles and crops it would have
    # drawn without the interruption, instead of replaying those of the first epochs.
    rng = loader.generator.get_state() if hasattr(loader, "generator") else None
    checkpoints.save_checkpoint(path, state.model, epoch=state.epoch, optimizer=state.optimizer, extra={
        "step": state.step, "history": state.history, "config": config_record(state.config),
        "callbacks": [cb.state_dict() for cb in callbacks], "loader_rng": rng,
        "attack_rng": None if state.attack_rng is None else state.attack_rng.get_state(),
        "mix_rng": None if state.mix_rng is None else state.mix_rng.bit_generator.state})


def _resume(state, path, callbacks, loader):
    ckpt = checkpoints.load_checkpoint(path, expected_arch=state.model.arch["name"])
    if json.dumps(ckpt["arch"]) != json.dumps(state.model.arch):  # a callback changed it (CUP-SS)
        from .models import create_model
        state.model = prepare_model(create_model(ckpt["arch"]["name"], **ckpt["arch"]["kwargs"]), state.device)
        state.rebuild_optimizer()
    state.model.load_state_dict(ckpt["state_dict"])
    state.optimizer.load_state_dict(ckpt["optimizer"])
    state.epoch, state.step = ckpt["epoch"], ckpt["extra"]["step"]
    state.history = list(ckpt["extra"]["history"])
    for cb, d in zip(callbacks, ckpt["extra"]["callbacks"]):
        cb.load_state_dict(d)
    if ckpt["extra"].get("loader_rng") is not None and hasattr(loader, "generator"):
        loader.generator.set_state(ckpt["extra"]["loader_rng"])
    if ckpt["extra"].get("attack_rng") is not None and state.attack_rng is not None:
        state.attack_rng.set_state(ckpt["extra"]["attack_rng"])
    if ckpt["extra"].get("mix_rng") is not None and state.mix_rng is not None:
        state.mix_rng.bit_generator.state = ckpt["extra"]["mix_rng"]


def config_record(config: TrainConfig) -> dict:
    """The config as plain values a weights-only checkpoint can hold (tuples become lists)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(config).items()}
