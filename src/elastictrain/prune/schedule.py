"""Gradual pruning inside ``train.fit``: masks tightened once per epoch along a density ramp, then
enforced after every optimiser step on the weights and on their momentum (so momentum cannot
resurrect a pruned weight), while fine-tuning continues at the final density.

Density follows a cubic in log-density (spec §5.8): log d(τ) = log d_f + (log d_0 − log d_f)(1 − τ)³.
Zhu & Gupta's cubic-in-density would remove ~90% of the survivors in the last fifth of a 1 → 1/1000
ramp; the log form spreads the removals evenly. Masks are monotone: a pruned weight is zero, scores
zero, and is never chosen again while the density falls.
"""
import math

import torch

from ..models.common import prunable_weights
from ..train import Callback
from .masks import PruneSpec, make_masks, pattern_library


def _plain_stack(model) -> bool:
    """Whether the order of ``prunable_weights`` is the data flow, each layer feeding only the next:
    VGG and the MLP, not a residual net (whose blocks also feed the identity path)."""
    return getattr(model, "arch", {}).get("name", "").startswith(("vgg", "mlp"))


def density_at(tau: float, d0: float, df: float) -> float:
    tau = min(max(tau, 0.0), 1.0)
    return math.exp(math.log(df) + (math.log(d0) - math.log(df)) * (1 - tau) ** 3)


class MaskCallback(Callback):
    """Prune ``state.model``'s conv/linear weights to ``target_density`` over ``ramp_epochs``.

    The starting density is the model's own (1.0 for a dense model, lower when a row continues from
    a sparser one). Masks are float tensors so that one ``_foreach_mul_`` enforces all of them.
    """

    def __init__(self, spec: PruneSpec, target_density: float, ramp_epochs: int, *, pattern_size: int = 8):
        self.spec, self.target, self.ramp = spec, target_density, max(1, ramp_epochs)
        self.pattern_size = pattern_size
        self.masks, self.library, self.d0 = {}, None, None
        self._bound_to, self._lists = (None, None), None

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
            self.masks = {n: m.to(weights[n].dtype) for n, m in
                          make_masks(weights, d, self.spec, self.library, chain=_plain_stack(state.model)).items()}
        self.apply(state)
        state.metrics["density"] = self.density()

    def after_step(self, state):
        self.apply(state)

    @torch.no_grad()
    def apply(self, state):
        params, masks = self._bound(state.model)
        torch._foreach_mul_(params, masks)
        bufs = [(state.optimizer.state.get(p) or {}).get("momentum_buffer") for p in params]
        live = [(b, m) for b, m in zip(bufs, masks) if b is not None]
        if live:
            torch._foreach_mul_([b for b, _ in live], [m for _, m in live])

    def _bound(self, model):
        """(weights, masks) as two aligned lists. Runs after every optimiser step, so the module walk
        happens only when the model (CUP-SS, resume) or the masks (a ramp update) have changed."""
        # Held references, not ids: a freed dict's id can be reused by the next one.
        if self._bound_to[0] is not model or self._bound_to[1] is not self.masks:
            weights = prunable_weights(model)
            params = [weights[n] for n in self.masks]
            if next(iter(self.masks.values())).device != params[0].device:  # restored on the CPU
                self.masks = {n: m.to(weights[n]) for n, m in self.masks.items()}
                self.library = None if self.library is None else self.library.to(params[0].device)
            self._bound_to, self._lists = (model, self.masks), (params, list(self.masks.values()))
        return self._lists

    def density(self) -> float:
        return sum(float(m.sum()) for m in self.masks.values()) / sum(m.numel() for m in self.masks.values())

    def state_dict(self):
        d = {"masks": {n: m.bool().cpu() for n, m in self.masks.items()}, "d0": self.d0}
        if self.library is not None:
            d["library"] = self.library.cpu()
        return d

    def load_state_dict(self, d):
        # Restored on the CPU; ``apply`` moves them next to the weights on first use.
        self.d0, self.library = d["d0"], d.get("library")
        self.masks = {n: m.float() for n, m in d["masks"].items()}
