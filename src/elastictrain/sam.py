"""Sharpness-aware minimisation (Foret et al. 2021, "SAM"), an option of ``fit`` (not in ElasticTrain).

Each step takes the gradient twice: once at the weights w, then at w + ρ·g/‖g‖, the nearby point
where the loss rises fastest; the optimiser steps with the second gradient from w. It seeks weights
whose loss stays low in a whole neighbourhood, which generalises better (lower CIFAR-10 test error for
every model in their tables). The 1000x model of row 03 fits 92.6% of its own training images and
loses 4.2 more points on the test set (``prune_variants.md``, session 28), a gap that the
regularisers tried before (weight decay, label smoothing, mixup) did not narrow. With ρ = 0.05, their
CIFAR-10 value, row 03 rose from 88.41% to 88.86% (session 45, ``prune_variants.md``).

Sparsity: only weights that are non-zero move. Pruned weights are exactly zero at every step (the
mask callbacks re-zero them after the optimiser), and the deployed model has no such directions, so
a perturbation there would measure a sharpness the sparse model cannot have. Weights and BatchNorm
running statistics are restored exactly (copied back, not subtracted), so the step leaves the masks
and the statistics as a single forward would.

The cost is a second forward and backward per step: twice a plain step's arithmetic, ~1.3x an
adversarial step, whose seven PGD passes are not repeated (session 47, ``robust_variants.md``). Measured
on ResNet-56 it is more, not yet explained: 3.5-5x per CUP-SS epoch (sessions 54-55, ``cup_variants.md``)
and 3.81x for the step alone at batch 256 compiled on an H100 (``benchmarks/train_throughput.py --sam``,
session 57).
"""
from contextlib import contextmanager

import torch
import torch.nn as nn


def _bn_buffers(model: nn.Module) -> list[torch.Tensor]:
    return [b for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
            for b in m.buffers()]


def _copies(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    out = [torch.empty_like(t) for t in tensors]  # allocations only: no kernel per tensor
    if out:
        torch._foreach_copy_(out, tensors)
    return out


@contextmanager
def perturbed(model: nn.Module, rho: float):
    """Inside: every parameter with a gradient sits at w + rho·g/‖g‖ (g zeroed where w is zero, ‖·‖
    over all of them together); on exit the weights and the BatchNorm running statistics are back to
    their values on entry, bit for bit. The gradients are left as the body made them."""
    if rho <= 0:
        raise ValueError(f"the SAM radius rho must be > 0, got {rho}")
    params = [p for p in model.parameters() if p.grad is not None]
    if not params:
        raise ValueError("SAM perturbs along the gradient: call backward before entering")
    buffers = _bn_buffers(model)
    with torch.no_grad():
        # Whole lists per call: this runs every training step, and an op per tensor cost ResNet-56
        # (173 parameters, 171 BatchNorm buffers) 873 ops per step (session 55); now 15, plus allocations.
        saved, saved_buffers = _copies(params), _copies(buffers)
        nonzero = torch._foreach_abs(torch._foreach_sign(params))  # exactly 1.0 where w != 0, else 0.0
        grads = torch._foreach_mul([p.grad for p in params], nonzero)
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
        # Scaled on the device: a .item() here would stall the GPU once per step.
        torch._foreach_add_(params, torch._foreach_mul(grads, rho / (norm + 1e-12)))
    try:
        yield
    finally:
        with torch.no_grad():  # one fused copy per list: this runs every training step
            torch._foreach_copy_(params, saved)
            if buffers:
                torch._foreach_copy_(buffers, saved_buffers)
