"""One ElasticTrain row end to end: dense (or a sparser row's) model → gradual pruning →
fine-tuning → final-epoch float32 accuracy on the full test set → ``TrainedModels/<row>.etm``.

Smoke mode runs the same code for a couple of steps on a subset (CPU is fine) and writes into a
temporary folder: it never touches ``TrainedModels/`` or ``checkpoints/``.
"""
import dataclasses
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from .. import baselines, checkpoints
from ..accuracy import evaluate
from ..averaging import WeightAverage
from ..data import make_loaders
from ..evaluation import load_shipped, ship
from ..metrics import count_weights
from ..models import create_model, list_models
from ..train import TrainConfig, default_device, fit
from .admm import ADMMCallback, AdmmSchedule
from .masks import PruneSpec
from .schedule import MaskCallback


INIT = "init:"   # a PruneRecipe base that starts from a fresh, randomly initialised model


@dataclass(frozen=True)
class PruneRecipe:
    row: str                        # rows.ROWS id; the model is shipped as TrainedModels/<row>.etm
    spec: PruneSpec
    ratio: float                    # paper-style target: conv+linear weights / non-zeros
    ramp_epochs: int                # density falls from the start model's to 1/ratio over these
    train: TrainConfig              # epochs = ramp + fine-tuning
    base: str = "vgg16"             # a baselines.DENSE key, a row id to continue from, or "init:<model>"
    teacher: str | None = None      # a baselines.DENSE key or a shipped row id to distil from (check_teacher)
    batch_size: int = 512
    pattern_size: int = 8
    rewire: float = 0.0             # RigL/DNR swap fraction at the first ramp update (MaskCallback)
    average: float = 0.0            # per-step decay of a weight average from the ramp's end on (0: none)
    recalibrate_batches: int = 0    # BN recalibration batches after each ramp update (MaskCallback)
    # Progressive ADMM (spec §5.8c) in place of the magnitude ramp: ramp_epochs must then be its
    # schedule.epochs, and the fine-tuning that follows is its last stage's retraining.
    admm: AdmmSchedule | None = None
    smoke_train_images: int = 256
    smoke_test_images: int = 200

    def __post_init__(self):
        baselines.check_teacher(self.teacher, self.train)
        if self.base.startswith(INIT) and self.base[len(INIT):] not in list_models():
            raise ValueError(f"base {self.base!r}: after {INIT!r} comes a model name, one of {list_models()}")
        if self.admm is not None and (self.ramp_epochs != self.admm.epochs or self.rewire or self.recalibrate_batches):
            raise ValueError(f"with ADMM, ramp_epochs must be the ADMM schedule's pruning epochs ({self.admm.epochs}, "
                             f"got {self.ramp_epochs}) and rewire/recalibrate_batches 0 (the ramp's options)")

    def smoke(self) -> "PruneRecipe":
        admm = None if self.admm is None else dataclasses.replace(self.admm, stages=1, admm_epochs=1, update_every=1)
        return dataclasses.replace(self, ramp_epochs=1, batch_size=64, admm=admm, train=dataclasses.replace(
            self.train, epochs=2, eval_every=0))


@dataclass
class RowResult:
    model: torch.nn.Module
    history: pd.DataFrame
    accuracy: float
    ratio: float
    path: Path
    base: dict


def _start_model(recipe, smoke, device):
    if recipe.base.startswith(INIT):  # pruned while it first learns, as DNR and sparse-from-scratch methods do
        torch.manual_seed(recipe.train.seed)
        return create_model(recipe.base[len(INIT):]), {"base": recipe.base}
    if recipe.base in baselines.DENSE:
        dense = baselines.train_dense(baselines.DENSE[recipe.base], smoke=smoke, device=device, progress=False)
        return dense.model, {"base": recipe.base, "base_sha256": dense.sha256,
                             "base_accuracy": round(dense.accuracy, 2)}
    return load_shipped(recipe.base)


def run_row(recipe: PruneRecipe, *, smoke: bool, device=None, progress=True) -> RowResult:
    device = torch.device(device or default_device())
    if smoke:
        recipe = recipe.smoke()
    model, base = _start_model(recipe, smoke, device)
    train_loader, test_loader = make_loaders(
        "cifar10", batch_size=recipe.batch_size, seed=recipe.train.seed, device=device,
        train_subset=recipe.smoke_train_images if smoke else None,
        test_subset=recipe.smoke_test_images if smoke else None)
    run_state = (checkpoints.scratch_dir(f"smoke-{recipe.row}-run-") if smoke
                 else checkpoints.checkpoints_dir()) / f".{recipe.row}.run"
    masks = (ADMMCallback(recipe.spec, 1 / recipe.ratio, recipe.admm) if recipe.admm is not None else
             MaskCallback(recipe.spec, 1 / recipe.ratio, recipe.ramp_epochs, pattern_size=recipe.pattern_size,
                          rewire=recipe.rewire, recalibrate_batches=recipe.recalibrate_batches))
    # A model of its own: the start model may be this very dense network, which training changes.
    teacher, teacher_accuracy = baselines.teacher_model(recipe.teacher, smoke=smoke, device=device)
    if teacher is not None:
        base.update(teacher=recipe.teacher, teacher_accuracy=teacher_accuracy)
    # After the masks, so that it averages the masked weights; the final model is that average.
    callbacks = [masks] + ([WeightAverage(recipe.average, recipe.ramp_epochs)] if recipe.average else [])
    model, history = fit(model, train_loader, test_loader, recipe.train, callbacks=callbacks, device=device,
                         checkpoint_path=run_state, progress=progress, teacher=teacher)
    accuracy = evaluate(model, test_loader)["top1"]
    total, nonzero = count_weights(model)
    path = ship(model, recipe.row, smoke=smoke, accuracy=accuracy, test_images=len(test_loader.labels),
                ratio=total / nonzero, dataset="cifar10", granularity=recipe.spec.granularity,
                balanced=recipe.spec.balanced is not None, epochs=len(history),
                train_time_s=round(float(history["epoch_time_s"].sum()), 1),
                device=baselines.environment()["device"],
                **({"weight_average": recipe.average} if recipe.average else {}),
                **({"rewire": recipe.rewire} if recipe.rewire else {}),
                **({"admm": dataclasses.asdict(recipe.admm)} if recipe.admm else {}), **base)
    run_state.unlink(missing_ok=True)
    return RowResult(model, history, accuracy, total / nonzero, path, base)
