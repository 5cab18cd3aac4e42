"""Gradual pruning inside ``train.fit``: masks tightened once per epoch along a density ramp, then
enforced after every optimiser step on the weights and on their momentum (so momentum cannot
resurrect a pruned weight), while fine-tuning continues at the final density.

Density follows a cubic in log-density (spec §5.8): log d(τ) = log d_f + (log d_0 − log d_f)(1 − τ)³.
Zhu & Gupta's cubic-in-density would remove ~90% of the survivors in the last fifth of a 1 → 1/1000
ramp; the log form spreads the removals evenly. Masks are monotone: a pruned weight is zero, scores
zero, and is never chosen again while the density falls.

Optional rewiring (spec §5.8b, RigL/DNR), for unstructured or kernel masks during the ramp: after each
mask update a fraction r of every layer's survivors (r from ``rewire`` down to 0 by a cosine over the
ramp) is swapped: the smallest items leave, and as many pruned items with the largest |gradient| (an
exponential average over the previous epoch's steps, DNR's momentum) come back at zero. An item is a
weight, or for kernel masks a whole k×k kernel of a conv (scored as ``make_masks`` scores it, by its
mean square, and regrown by its mean |gradient|; linear layers stay per weight, as there): DNR's
rewiring serves structured (channel) masks too, and kernels are the structured unit here. Layer counts
are unchanged; masks are then no longer monotone.

Optional BN recalibration after each ramp update (spec §5.8: ``recalibrate_batches`` training batches in
train mode, no gradient). It matters where a model is evaluated right after a mask change; here masks
change at the start of an epoch and the epoch's own steps (momentum 0.1, ~98 of them at batch 512)
replace the running statistics before the next evaluation anyway, so the rows leave it off.
"""
import math

import torch

from ..accuracy import recalibrate_bn
from ..models.common import prunable_weights
from ..train import Callback
from .masks import PruneSpec, make_masks, pattern_library, per_kernel, topk_mask, whole_kernels


def _plain_stack(model) -> bool:
    """Whether the order of ``prunable_weights`` is the data flow, each layer feeding only the next:
    VGG and the MLP, not a residual net (whose blocks also feed the identity path)."""
    return getattr(model, "arch", {}).get("name", "").startswith(("vgg", "mlp"))


def _in_layout_of(t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``mask`` with ``t``'s dtype, device and strides (itself when it has them already)."""
    if (mask.dtype, mask.device, mask.stride()) == (t.dtype, t.device, t.stride()):
        return mask
    return torch.empty_like(t).copy_(mask)


def density_at(tau: float, d0: float, df: float) -> float:
    tau = min(max(tau, 0.0), 1.0)
    return math.exp(math.log(df) + (math.log(d0) - math.log(df)) * (1 - tau) ** 3)


class MaskCallback(Callback):
    """Prune ``state.model``'s conv/linear weights to ``target_density`` over ``ramp_epochs``.

    The starting density is the model's own (1.0 for a dense model, lower when a row continues from
    a sparser one). Masks are float tensors so that one ``_foreach_mul_`` enforces all of them.
    """

    def __init__(self, spec: PruneSpec, target_density: float, ramp_epochs: int, *, pattern_size: int = 8,
                 rewire: float = 0.0, recalibrate_batches: int = 0):
        if not 0 <= rewire < 1:
            raise ValueError(f"rewire is the fraction of survivors swapped at the first mask update, in [0, 1); "
                             f"got {rewire}")
        if rewire and (spec.granularity == "pattern" or spec.balanced is not None):
            raise ValueError("rewiring swaps single weights or whole kernels: it needs unstructured or kernel "
                             f"masks without a balance constraint (got granularity {spec.granularity!r}, "
                             f"balanced={spec.balanced}); use rewire=0 for this spec")
        self.spec, self.target, self.ramp = spec, target_density, max(1, ramp_epochs)
        if recalibrate_batches < 0:
            raise ValueError(f"recalibrate_batches must be >= 0, got {recalibrate_batches}")
        self.pattern_size, self.rewire, self.recalibrate_batches = pattern_size, rewire, recalibrate_batches
        self.masks, self.library, self.d0 = {}, None, None
        self.grad = None      # per weight: the average dense gradient that regrowth ranks by
        self._bound_to, self._lists, self._buffers = (None, None), None, None

    def on_train_begin(self, state):
        weights = prunable_weights(state.model)
        self.masks = {n: (w != 0).to(w.dtype) for n, w in weights.items()}
        total = sum(w.numel() for w in weights.values())
        self.d0 = sum(float(m.sum()) for m in self.masks.values()) / total
        if self.target > self.d0:
            raise ValueError(f"target density {self.target:.5f} is above the model's own {self.d0:.5f}: "
                             "pruning cannot add weights")
        if self.spec.granularity == "pattern":
            self.library = pattern_library(weights, self.pattern_size)

    def before_epoch(self, state):
        if state.epoch < self.ramp:
            d = density_at((state.epoch + 1) / self.ramp, self.d0, self.target)
            weights = prunable_weights(state.model)
            masks = make_masks(weights, d, self.spec, self.library, chain=_plain_stack(state.model))
            fraction = self.rewire_fraction(state.epoch)
            if fraction > 0 and self.grad is not None:
                masks = self._rewired(masks, weights, fraction, state.optimizer)
            self.masks = masks  # ``_bound`` gives each its weight's dtype and layout, once
            if self.rewire_fraction(state.epoch + 1) == 0:
                self.grad = None
        self.apply(state)
        if state.epoch < self.ramp and self.recalibrate_batches:  # statistics of the newly masked weights
            recalibrate_bn(state.model, state.train_loader, self.recalibrate_batches)
        state.metrics["density"] = self.density()

    def after_step(self, state):
        self.apply(state)
        if self.rewire_fraction(state.epoch + 1) > 0:  # the next mask update regrows by these gradients
            params = self._lists[0]  # bound by ``apply`` just above
            if self.grad is None:  # in the gradients' layout, so the lerp below stays one fused kernel
                self.grad = {n: torch.zeros_like(p.grad, dtype=torch.float32) for n, p in zip(self.masks, params)}
            torch._foreach_lerp_(list(self.grad.values()), [p.grad.float() for p in params], 0.1)

    def rewire_fraction(self, epoch: int) -> float:
        """Fraction of survivors swapped at the mask update before ``epoch``: 0 after the ramp, and at
        its last update, so the final mask is pure magnitude."""
        if not self.rewire or epoch >= self.ramp:
            return 0.0
        return self.rewire * 0.5 * (1 + math.cos(math.pi * (epoch + 1) / self.ramp))

    @torch.no_grad()
    def _rewired(self, masks: dict, weights: dict, fraction: float, optimizer) -> dict:
        out = {}
        for n, mask in masks.items():
            w = weights[n]
            kernels = self.spec.granularity == "kernel" and w.dim() == 4
            per_item = per_kernel if kernels else (lambda t: t)
            keep = mask.flatten(2).any(2) if kernels else mask
            free = ~keep
            swap = min(int(fraction * int(keep.sum())), int(free.sum()))
            if swap == 0:
                out[n] = mask
                continue
            magnitude = per_item(w.detach().float() ** 2).masked_fill(free, float("inf"))
            # Grown among the items pruned before this update, so none just dropped comes straight back.
            growth = per_item(self.grad[n].to(w.device).abs()).masked_fill(keep, -1.0)
            drop, grow = topk_mask(-magnitude, swap), topk_mask(growth, swap)
            new = (keep & ~drop) | grow
            if kernels:
                new, grow = whole_kernels(new, w), whole_kernels(grow, w)
            w.masked_fill_(grow, 0)               # regrown weights start at zero (spec §5.8b)
            buf = (optimizer.state.get(w) or {}).get("momentum_buffer")
            if buf is not None:
                buf.masked_fill_(grow, 0)
            out[n] = new
        return out

    @torch.no_grad()
    def apply(self, state):
        params, masks, bufs, buf_masks = self._bound(state.model, state.optimizer)
        torch._foreach_mul_(params, masks)
        if bufs:
            torch._foreach_mul_(bufs, buf_masks)

    def _bound(self, model, optimizer):
        """(weights, masks, momentum buffers, their masks) as aligned lists. Runs after every optimiser
        step, so the module walk happens only when the model (CUP-SS, resume) or the masks (a ramp
        update) have changed, and the buffer lookup only when the optimiser's buffers have.

        ``_foreach_mul_`` takes its fused path only when each pair of tensors shares strides; a mask
        built by ``make_masks`` is contiguous while the trainer's weights are channels_last, and on that
        slow path every layer costs its own strided kernel and host-side setup. So each mask is stored
        in its weight's layout, and each buffer gets a mask in its own: a buffer starts as a clone of
        the first gradient, whose layout is the backward's choice."""
        # Held references, not ids: a freed dict's id can be reused by the next one.
        if self._bound_to[0] is not model or self._bound_to[1] is not self.masks:
            weights = prunable_weights(model)
            params = [weights[n] for n in self.masks]
            self.masks = {n: _in_layout_of(w, m) for (n, m), w in zip(self.masks.items(), params)}
            device = params[0].device  # restored state lives on the CPU until first use
            self.library = None if self.library is None else self.library.to(device)
            self.grad = None if self.grad is None else {n: g.to(device) for n, g in self.grad.items()}
            self._bound_to, self._lists, self._buffers = (model, self.masks), (params, list(self.masks.values())), None
        params, masks = self._lists
        first = (optimizer.state.get(params[0]) or {}).get("momentum_buffer")
        if self._buffers is None or self._buffers[0] is not first:
            pairs = [(b, _in_layout_of(b, m)) for p, m in zip(params, masks)
                     if (b := (optimizer.state.get(p) or {}).get("momentum_buffer")) is not None]
            self._buffers = (first, [b for b, _ in pairs], [m for _, m in pairs])
        return params, masks, self._buffers[1], self._buffers[2]

    def density(self) -> float:
        return sum(float(m.sum()) for m in self.masks.values()) / sum(m.numel() for m in self.masks.values())

    def state_dict(self):
        d = {"masks": {n: m.bool().cpu() for n, m in self.masks.items()}, "d0": self.d0}
        if self.library is not None:
            d["library"] = self.library.cpu()
        if self.grad is not None:  # a resumed ramp regrows exactly as the uninterrupted one would
            d["grad"] = {n: g.cpu() for n, g in self.grad.items()}
        return d

    def load_state_dict(self, d):
        # Restored on the CPU; ``apply`` moves them next to the weights on first use.
        self.d0, self.library, self.grad = d["d0"], d.get("library"), d.get("grad")
        self.masks = {n: m.float() for n, m in d["masks"].items()}
