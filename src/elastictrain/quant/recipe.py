"""One quantized ElasticTrain row end to end: a shipped sparse row's file → multi-codebook weight
sharing (mask frozen; optionally latent weights first, ``latent``; then centroids trained) → BN
recalibration → fp16 snapping and BN folding → final float32 accuracy on the full test set →
``TrainedModels/<row>.etm`` with packed codes.

The accuracy is measured on the exact model that is written (after every rounding), and the
written file is read back and compared tensor by tensor before the function returns.
Smoke mode runs the same code for a couple of steps on a subset (CPU is fine) and writes into a
temporary folder: it never touches ``TrainedModels/``.
"""
import dataclasses
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from .. import baselines
from ..accuracy import evaluate, recalibrate_bn
from ..data import make_loaders
from ..evaluation import load_shipped, ship
from ..metrics import count_weights
from ..models.common import prunable_weights
from ..storage import load_compressed
from ..train import TrainConfig, default_device, fit
from .codebook import QuantSpec, bake_, quantize_, unique_per_group
from .compact import check_foldable, fold_bn_, snap_fp16_
from .latent import LatentPhase, snap_


@dataclass(frozen=True)
class QuantRecipe:
    row: str                        # rows.ROWS id; the model is shipped as TrainedModels/<row>.etm
    base: str                       # the row whose shipped file is quantized (its mask is kept)
    spec: QuantSpec
    train: TrainConfig              # quantization-aware fine-tuning of the centroids (and BN)
    teacher: str | None = None      # a baselines.DENSE key or a shipped row id to distil from (check_teacher)
    batch_size: int = 512
    recal_batches: int = 50         # BN statistics re-estimated over this many training batches
    # quantize_'s grad: "sum" (Deep Compression's true gradient) or "mean" (the projected SGD step).
    # With sum, lr 0.01 diverged within 8 smoke steps on the 50x model (clusters of ~1300 weights:
    # train accuracy 95% -> 13%) while mean kept it at 93.5%; at 1000x clusters are ~65 weights.
    centroid_grad: str = "mean"
    # The first epochs of ``train`` in the spec's mode B (``latent``: latent weights, straight-through,
    # codebooks re-clustered before each epoch), the rest in mode A with the assignments they reach.
    # 0: mode A throughout.
    latent_epochs: int = 0
    fp16: bool = True               # snap shared values and folded BN scale/shift to fp16
    seed: int = 0                   # k-means restarts (only groups too large for the exact DP use them)
    smoke_train_images: int = 256
    smoke_test_images: int = 200

    def __post_init__(self):
        baselines.check_teacher(self.teacher, self.train)
        if not 0 <= self.latent_epochs <= self.train.epochs:
            raise ValueError(f"latent_epochs (mode B) must be from 0 to the {self.train.epochs} training epochs, "
                             f"got {self.latent_epochs}")

    def smoke(self) -> "QuantRecipe":
        # Two epochs: with mode B, one in each mode.
        return dataclasses.replace(self, batch_size=64, recal_batches=2, latent_epochs=min(self.latent_epochs, 1),
                                   train=dataclasses.replace(self.train, epochs=2, eval_every=0))


@dataclass
class QuantResult:
    model: torch.nn.Module
    history: pd.DataFrame
    accuracy: float                 # the shipped model, float32, the (smoke: sub-)test set
    clustered_accuracy: float       # right after k-means, before any fine-tuning
    ratio: float                    # paper-style: weights / non-zeros × 32 / bits
    path: Path
    base: dict
    initial_codebooks: dict         # weight name → [groups, 2^bits] codebook from k-means
    channels: dict                  # fold_bn_'s channel counts


def check_quantized(model, spec: QuantSpec, masks: dict):
    """The row's invariants: the mask is the start model's, each group holds <= 2^bits values."""
    for name, w in prunable_weights(model).items():
        if not torch.equal(w.detach().cpu() != 0, masks[name]):
            raise AssertionError(f"{name}: the sparsity mask changed during quantization")
        most = int(unique_per_group(w, spec.structure).max())
        if most > spec.levels:
            raise AssertionError(f"{name}: a group holds {most} distinct non-zero values > {spec.levels}")


def run_quant_row(recipe: QuantRecipe, *, smoke: bool, device=None, progress=True) -> QuantResult:
    device = torch.device(device or default_device())
    if smoke:
        recipe = recipe.smoke()
    model, base = load_shipped(recipe.base)
    check_foldable(model)  # fold_bn_ runs after training: refuse what it cannot fold before any training
    masks = {n: (w.detach() != 0).clone() for n, w in prunable_weights(model).items()}
    train_loader, test_loader = make_loaders(
        "cifar10", batch_size=recipe.batch_size, seed=recipe.train.seed, device=device,
        train_subset=recipe.smoke_train_images if smoke else None,
        test_subset=recipe.smoke_test_images if smoke else None)
    if recipe.latent_epochs:
        books = snap_(model, recipe.spec, seed=recipe.seed)
        callbacks = [LatentPhase(recipe.latent_epochs, recipe.centroid_grad)]
    else:
        books, callbacks = quantize_(model, recipe.spec, seed=recipe.seed, grad=recipe.centroid_grad), []
    clustered = evaluate(model.to(device), test_loader)["top1"]
    # No resumable checkpoint: a row is ~1 minute of GPU time, a rerun is cheaper than resuming
    # a parametrized model.
    teacher, teacher_accuracy = baselines.teacher_model(recipe.teacher, smoke=smoke, device=device)
    if teacher is not None:
        base.update(teacher=recipe.teacher, teacher_accuracy=teacher_accuracy)
    model, history = fit(model, train_loader, test_loader, recipe.train, callbacks=callbacks, device=device,
                         progress=progress, teacher=teacher)
    bake_(model)
    if recipe.fp16:
        snap_fp16_(model, weights=True, bn=False)    # the shared values first: BN statistics see them
    recalibrate_bn(model, train_loader, batches=recipe.recal_batches)
    channels = fold_bn_(model)
    if recipe.fp16:
        snap_fp16_(model, weights=False, bn=True)
    check_quantized(model, recipe.spec, masks)
    accuracy = evaluate(model, test_loader)["top1"]
    total, nonzero = count_weights(model)
    ratio = total / nonzero * 32 / recipe.spec.bits
    path = ship(model, recipe.row, smoke=smoke, accuracy=accuracy, test_images=len(test_loader.labels),
                ratio=ratio, quant=recipe.spec, bits=recipe.spec.bits,
                codebook_structure=list(recipe.spec.structure.as_tuple()), centroid_grad=recipe.centroid_grad,
                latent_epochs=recipe.latent_epochs,
                dataset="cifar10",
                clustered_accuracy=round(clustered, 2), epochs=len(history),
                train_time_s=round(float(history["epoch_time_s"].sum()), 1), channels=channels,
                device=baselines.environment()["device"], **base)
    _same_as_file(model, path)
    return QuantResult(model, history, accuracy, clustered, ratio, path, base, books, channels)


def _same_as_file(model, path):
    """The file must rebuild the measured model bit for bit (else the recorded accuracy is not its)."""
    back = load_compressed(path).state_dict()
    for k, v in model.state_dict().items():
        if not k.endswith("num_batches_tracked") and not torch.equal(v.detach().cpu(), back[k]):
            raise AssertionError(f"{path}: {k} does not round-trip bit for bit")
