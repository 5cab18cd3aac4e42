"""What a trained model is measured with: top-1 / top-5 accuracy over a whole split, and the BatchNorm
running statistics re-estimated before it is measured (spec §5.8).

Separate from ``train`` because everything that reports a figure (shipped files, robust evaluation,
the notebooks) needs these and none of the training loop.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from . import distributed
from .precision import autocast


@torch.no_grad()
def evaluate(model: nn.Module, data, *, amp: bool = False, device=None) -> dict:
    """Top-1 / top-5 accuracy (%) and mean loss over every sample of ``data``.

    ``data`` is a loader yielding (x, y) or a dataset name ('cifar10', 'mnist'), in which case the
    full official test split is used. ``amp`` evaluates in bf16 on CUDA (training curves only:
    reported figures use float32). A loader whose ``sharded`` is true gives each rank its own part
    of the split (``imagenet.FolderLoader`` under torchrun): the counts are summed over ranks, so
    every rank gets the figures of the whole split.
    """
    if isinstance(data, str):
        from .data import GpuLoader, load_split
        device = torch.device(device or next(model.parameters()).device)
        data = GpuLoader(load_split(data, train=False), 1000, train=False, device=device)
    was_training = model.training
    model.eval()
    dev = next(model.parameters()).device
    n, top1, top5, loss = 0, 0, 0, 0.0
    ctx = autocast(dev, amp)
    # Reported figures are float32 proper: cuDNN's TF32 convolutions would make a GPU measurement
    # disagree with a CPU re-measurement of the same file on borderline images.
    # The flags are process-wide: restored even when a measurement is interrupted, or the training
    # that follows it in the same process would run without TF32.
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = amp and tf32[0]
    try:
        for x, y in data:
            x, y = x.to(dev), y.to(dev)
            with ctx:
                out = model(x).float()
            loss += F.cross_entropy(out, y, reduction="sum").item()
            k = min(5, out.shape[1])
            pred = out.topk(k, 1).indices
            top1 += (pred[:, 0] == y).sum().item()
            top5 += (pred == y[:, None]).any(1).sum().item()
            n += len(y)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
        model.train(was_training)
    if getattr(data, "sharded", False):
        n, top1, top5, loss = distributed.all_reduce_sum([n, top1, top5, loss])
        n, top1, top5 = int(n), int(top1), int(top5)
    return {"top1": 100.0 * top1 / n, "top5": 100.0 * top5 / n, "loss": loss / n, "n": n}


@torch.no_grad()
def recalibrate_bn(model: nn.Module, loader, batches: int = 50):
    """Re-estimate BatchNorm running statistics in train mode without gradients.

    Used after mask updates and before evaluation of pruned models (spec §5.8): a mask change
    shifts every downstream activation distribution, and stale statistics cost accuracy.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return model
    was_training = model.training
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the recalibration batches
    model.train()
    dev = next(model.parameters()).device
    for i, (x, _) in enumerate(loader):
        if i == batches:
            break
        with autocast(dev):
            model(x.to(dev))
    for m, momentum in zip(bns, momenta):
        m.momentum = momentum
    model.train(was_training)
    return model
