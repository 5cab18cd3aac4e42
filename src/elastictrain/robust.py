"""Adversarial robustness of a compressed model (spec elastictrain.md §2.7, §5.9; DNR, §3.1).

``robust_evaluate`` measures top-1 accuracy on clean images and under FGSM and PGD-k (L∞, eps 8/255,
PGD step 0.01, uniform random start), each attack computed against the model itself in eval mode.
The robust rows (R1, R2) are ordinary ``prune.recipe`` rows trained with DNR's hybrid loss
(``TrainConfig.adversarial_beta``); their figures are measured on the model loaded from the shipped
file and written into that file's metadata (``record``) without changing a byte of its weights,
so a notebook, or anyone later, re-measures them from the file and compares (``agreement``).
"""
import contextlib
import os
import re
from pathlib import Path

import pandas as pd
import torch
import torch.nn as nn

from . import attacks as _attacks
from .accuracy import evaluate
from .data import GpuLoader, load_split
from .evaluation import AGREEMENT, measure, trained_models_dir
from .metrics import paper_compression
from .rows import ROWS
from .storage import load_compressed, read_header, save_compressed
from .train import default_device, prepare_model

ATTACKS = ("clean", "fgsm", "pgd7", "pgd20")
LABELS = {"clean": "clean", "fgsm": "FGSM"}

# A re-measurement on another GPU may differ: its bf16 kernels round the attack's gradients
# differently, and a sign flip of a near-zero component moves an adversarial image. 0.3 points
# (30 of 10,000 images) is our bound for that, set before the first GPU run. On one machine a
# measurement should repeat exactly (deterministic cuDNN, seeded random starts); on the CPU it does.
ROBUST_AGREEMENT = 0.3

# DNR's published figures (spec §3.1 and the anchors table): VGG16 only has a clean figure (the name
# of its released checkpoint); RobustBench lists a DNR ResNet-18 under AutoAttack.
DNR = [
    {"model": "DNR VGG16 (paper)", "sparsity": "unstructured", "compression": 20.0, "clean": 86.74,
     "fgsm": None, "pgd7": None, "pgd20": None, "eps": 0.031,
     "note": "checkpoint vgg16_cifar10_dens0.05_magnitude_epoch200_testAcc_86.74.pt, 200 adversarial "
             "epochs; no FGSM/PGD figure published"},
    {"model": "DNR ResNet-18 (RobustBench)", "sparsity": "unstructured", "compression": 20.0, "clean": 87.32,
     "fgsm": None, "pgd7": None, "pgd20": None, "eps": 8 / 255,
     "note": "40.41% under AutoAttack (stronger than PGD); another architecture, for scale only"},
]


def _label(name: str) -> str:
    return LABELS.get(name) or f"PGD-{name[3:]}"


def _accuracies(figures: dict) -> list[str]:
    """The attack names among a figures dict's keys (the rest describe the measurement)."""
    return [k for k in figures if k in LABELS or re.fullmatch(r"pgd[0-9]+", k)]


def _attack(name: str, eps: float, step: float, generator: torch.Generator):
    if name == "clean":
        return None
    if name == "fgsm":
        return lambda model, x, y: _attacks.fgsm(model, x, y, eps=eps)
    if m := re.fullmatch(r"pgd([1-9][0-9]*)", name):
        steps = int(m.group(1))
        return lambda model, x, y: _attacks.pgd(model, x, y, eps=eps, step_size=step, steps=steps,
                                                generator=generator)
    raise ValueError(f"unknown attack {name!r}: expected 'clean', 'fgsm' or 'pgd<steps>' (e.g. 'pgd7')")


def _batches(data, batch_size, limit, device) -> list:
    """The first ``limit`` test images (all with None) as batches on ``device``, built once so that
    every attack sees the same ones."""
    if isinstance(data, str):
        split = load_split(data, train=False)
        data = GpuLoader(split.subset(limit) if limit else split, batch_size, train=False, device=device)
    out, seen = [], 0
    for x, y in data:
        if limit is not None:
            x, y = x[:limit - seen], y[:limit - seen]
        if len(y) == 0:
            break
        out.append((x.to(device), y.to(device)))
        seen += len(y)
    return out


@contextlib.contextmanager
def _deterministic_cudnn():
    # cudnn.benchmark (which fit turns on) may pick another convolution algorithm on the next call,
    # with other roundings of the attack's gradients; fixed algorithms make a measurement repeat.
    saved = torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = False, True
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = saved


def robust_evaluate(model: nn.Module, data="cifar10", *, eps: float = 8 / 255, pgd_step: float = 0.01,
                    attacks=ATTACKS, batch_size: int = 500, limit: int | None = None, seed: int = 0,
                    device=None) -> dict:
    """Top-1 accuracy (%) on the test set, clean and under each attack, with what was measured.

    ``data``: a dataset name (its full official test split) or a loader yielding [0, 1] images;
    ``limit``: only the first n images (smoke runs). ``attacks``: 'clean', 'fgsm', 'pgd<k>'. The model
    is moved to ``device`` (default: the GPU when there is one). Attacks run in bf16 on CUDA, in
    float32 on the CPU; the forward that scores the adversarial images is float32 without TF32, as
    ``accuracy.evaluate`` does for every reported figure. Every PGD attack draws its random start from a
    generator seeded with ``seed``, so a measurement repeats exactly on the same machine.
    """
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1 test image, got {limit}")
    device = torch.device(device or default_device())
    # One generator per attack, seeded alike: a figure does not depend on which others are asked for.
    plan = {name: _attack(name, eps, pgd_step, torch.Generator(device=device).manual_seed(seed))
            for name in attacks}
    model = prepare_model(model, device)
    batches = _batches(data, batch_size, limit, device)
    out = {}
    with _deterministic_cudnn():
        for name, attack in plan.items():
            # evaluate pulls the images lazily; the attacks switch gradients back on for themselves.
            images = batches if attack is None else ((attack(model, x, y), y) for x, y in batches)
            out[name] = round(evaluate(model, images)["top1"], 2)
    return {**out, "test_images": sum(len(y) for _, y in batches), "eps": eps, "pgd_step": pgd_step,
            "seed": seed, "attack_device": device.type,
            "attack_dtype": "bfloat16" if device.type == "cuda" else "float32"}


def record(path, figures: dict) -> Path:
    """Write ``figures`` (from ``robust_evaluate``) into the ``.etm`` file's metadata as ``robust``.

    The file's own model is re-encoded with the extended metadata; storage is lossless, so the payload
    (every weight byte) must come out identical, which its CRC and size confirm before the file is
    replaced (atomically). The file is never left half-written or with other weights.
    """
    path = Path(path)
    before = read_header(path)
    model = load_compressed(path)
    tmp = path.with_name(f".{path.name}.robust")
    save_compressed(model, tmp, {**model.meta, "robust": figures})
    after = read_header(tmp)
    if (after["payload_crc32"], after["payload_bytes"]) != (before["payload_crc32"], before["payload_bytes"]):
        tmp.unlink()
        raise ValueError(f"{path}: re-encoding changed the weights' bytes; the figures were not recorded")
    os.replace(tmp, path)
    return path


def measure_and_record(path, **kwargs) -> dict:
    """``robust_evaluate`` of the model loaded from ``path`` (so the shipped weights, nothing else),
    recorded into the file's metadata; ``kwargs`` go to ``robust_evaluate``."""
    model = load_compressed(path)
    figures = robust_evaluate(model, model.meta.get("dataset", "cifar10"), **kwargs)
    record(path, figures)
    return figures


def shipped_file(row: str, smoke_path=None) -> Path:
    """``TrainedModels/<row>.etm``; while that is not committed yet, ``smoke_path`` (a smoke run's own
    file) when one is given, so the notebook's shipped-model section runs in smoke mode before the
    full run."""
    path = trained_models_dir() / f"{row}.etm"
    return Path(smoke_path) if smoke_path is not None and not path.exists() else path


def measure_file(path, device="cpu") -> dict:
    """``evaluation.measure``; a smoke run's file is measured on the test images its run measured
    (the first ``test_images`` of the split), which is comparable with its record and takes seconds."""
    meta = read_header(path)["meta"]
    if not meta.get("smoke"):
        return measure(path, device=device)
    split = load_split(meta.get("dataset", "cifar10"), train=False).subset(meta["test_images"])
    return measure(path, device=device, dataset=GpuLoader(split, 1000, train=False, device=device))


def recorded_summary(meta: dict) -> str:
    """The robust figures a shipped file recorded, as one block of text."""
    r = meta.get("robust")
    if r is None:
        return "  robust: none recorded in this file"
    return (f"  robust (recorded; L∞ eps {r['eps'] * 255:.2f}/255, PGD step {r['pgd_step']}, seed {r['seed']}, "
            f"{r['test_images']} test images, attacks in {r['attack_dtype']} on {r['attack_device']}):\n    "
            + "   ".join(f"{_label(n)} {r[n]:.2f}%" for n in _accuracies(r)))


def agreement(recorded: dict, measured: dict) -> str:
    """Recorded vs re-measured figures, one line per attack. Figures compare only under the same
    settings; then clean must agree within ``evaluation.AGREEMENT`` and each attack within
    ``ROBUST_AGREEMENT`` (exactly, when the attacks ran in float32 on the CPU both times)."""
    keys = ("test_images", "eps", "pgd_step", "seed", "attack_device")
    differ = [k for k in keys if recorded.get(k) != measured.get(k)]
    if differ:
        return ("  not comparable with the record (" + ", ".join(f"{k} {recorded.get(k)} vs {measured.get(k)}"
                                                           for k in differ) + ")")
    exact = measured["attack_device"] == "cpu"
    lines = []
    for name in (k for k in _accuracies(measured) if k in recorded):
        tol = 0.0 if exact else AGREEMENT if name == "clean" else ROBUST_AGREEMENT
        ok = abs(measured[name] - recorded[name]) <= tol + 1e-9
        lines.append(f"  {_label(name):<7} recorded {recorded[name]:6.2f}%   re-measured {measured[name]:6.2f}%   "
                     f"{'agrees' if ok else 'DISAGREES'} within {tol}")
    return "\n".join(lines)


def dnr_table(models: dict) -> pd.DataFrame:
    """Our shipped robust models (row id → model loaded from its file, with recorded ``robust``
    figures) beside DNR's published figures. Compression is counted from the loaded weights."""
    ours = [{"model": f"{row}: {ROWS[row].description}", "sparsity": m.meta["granularity"],
             "compression": round(paper_compression(m), 2),
             **{k: m.meta["robust"].get(k) for k in ("clean", "fgsm", "pgd7", "pgd20")},
             "eps": m.meta["robust"]["eps"],
             "note": f"ours, final epoch, {m.meta['robust']['test_images']} test images"} for row, m in models.items()]
    table = pd.DataFrame(ours + DNR)
    table["eps"] = table["eps"].map(lambda e: f"{e:.4f}")
    return table.rename(columns={k: _label(k) + " %" for k in ("clean", "fgsm", "pgd7", "pgd20")})
