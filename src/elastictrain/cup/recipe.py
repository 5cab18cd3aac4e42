"""CUP's MNIST experiment (cup.md §2.3): the dense MLP 784-500-300-10 pruned to 100/60 hidden units by
CUP (manual mode) and by the random / L1 / L2 baselines of Li et al., each measured before and
after retraining with the dense recipe from its pruned weights and a fresh optimiser.
"""
import copy
import dataclasses

import pandas as pd
import torch

from .. import baselines
from ..accuracy import evaluate
from ..data import make_loaders
from ..evaluation import ship
from ..flops import count_flops, count_params
from ..train import default_device, fit
from .surgery import cup_prune, rank_prune

# CUP's printed figures (best epoch of each 30-epoch retraining; cup.md §2.3).
PAPER_MNIST = {"CUP": (85.37, 98.63), "random": (41.59, 98.45), "L2": (79.59, 98.47), "L1": (80.15, 98.38)}


def mnist_comparison(keep: dict, *, smoke: bool, row: str = "C1", seed: int = 0, device=None, progress=True):
    """Returns ``(table, models, path)``: one row per method; the dense model and each retrained
    model by method name; the shipped file of the retrained CUP model (``TrainedModels/<row>.etm``)."""
    device = torch.device(device or default_device())
    cfg = baselines.DENSE["mlp"]
    dense = baselines.train_dense(cfg, smoke=smoke, device=device, progress=False)
    if smoke:
        cfg = cfg.smoke()
    train_loader, test_loader = make_loaders(
        "mnist", batch_size=cfg.batch_size, seed=seed, device=device, crop_pad=cfg.crop_pad,
        train_subset=cfg.smoke_train_images if smoke else None,
        test_subset=cfg.smoke_test_images if smoke else None)
    base = dense.model.to(device)
    pruned = {"CUP": cup_prune(base, keep=keep)[0],
              "random": rank_prune(base, keep, "random", seed=seed)[0],
              "L2": rank_prune(base, keep, "l2")[0],
              "L1": rank_prune(base, keep, "l1")[0]}
    buggy = cup_prune(base, keep=keep, faithful_bias_bug=True)[0]  # quirk Q1, before retraining only
    base_flops = count_flops(base)
    rows, models = [{"method": "dense", "before retraining": None, "after retraining": dense.accuracy,
                     "params": count_params(base), "FLOPs": base_flops, "FR": 1.0,
                     "paper before": None, "paper after": 98.63}], {}
    for name, model in pruned.items():
        before = evaluate(model.to(device), test_loader)["top1"]
        train_cfg = dataclasses.replace(cfg.train, seed=seed)
        retrained, _ = fit(copy.deepcopy(model), train_loader, test_loader, train_cfg, device=device,
                           progress=progress)
        models[name] = retrained.cpu().eval()
        rows.append({"method": name, "before retraining": before,
                     "after retraining": evaluate(retrained.to(device), test_loader)["top1"],
                     "params": count_params(model), "FLOPs": count_flops(model),
                     "FR": base_flops / count_flops(model), "paper before": PAPER_MNIST[name][0],
                     "paper after": PAPER_MNIST[name][1]})
    models["dense"] = base.cpu().eval()
    cup = rows[1]
    path = ship(models["CUP"], row, smoke=smoke, accuracy=cup["after retraining"], test_images=len(test_loader.labels),
                ratio=cup["FR"], dataset="mnist", keep=dict(keep), device=baselines.environment()["device"],
                base_sha256=dense.sha256, base_accuracy=round(dense.accuracy, 2))
    rows.append({"method": "CUP, original's bias bug (Q1)",
                 "before retraining": evaluate(buggy.to(device), test_loader)["top1"], "after retraining": None,
                 "params": count_params(buggy), "FLOPs": count_flops(buggy), "FR": base_flops / count_flops(buggy),
                 "paper before": 85.37, "paper after": None})
    return pd.DataFrame(rows), models, path
