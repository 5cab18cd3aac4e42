"""Progressive ADMM pruning inside ``train.fit`` (spec §3.2, §5.8c): the spec's fallback for 1000×.

Gradual magnitude pruning (``schedule.MaskCallback``) cuts the smallest weights outright. ADMM first
*pulls* the weights towards their projection onto the sparse set and cuts only once they are close:

    minimise  loss(W) + ρ/2·‖W − Z + U‖²,   Z ← Proj_S(W + U),   U ← U + W − Z   (scaled dual form)

Each stage targets one density on a geometric path from the start model's density to the target:
``admm_epochs`` with the penalty on (Z and U renewed every ``update_every`` epochs, ρ multiplied by
``rho_growth`` at each renewal, the spec's ρ₀ = 1e-3 × 1.3), then a hard projection of W onto the
stage's density and ``retrain_epochs`` of masked training (after the last stage, the row's own
fine-tuning, with its cosine schedule, is the retraining). Proj_S is ``make_masks`` at that density,
so the layer budgets are the same LAMP allocation the ramp uses.

The penalty is applied after each optimiser step as a decoupled pull, W ← W − lr·ρ·(W − Z + U), the
way decoupled weight decay is: one fused kernel per step and no change to the trainer's loss.
Between stages the previous stage's mask stays enforced (on weights and momentum), so Z's support is
always inside it and the density only falls.
"""
from dataclasses import dataclass

import torch

from ..models.common import prunable_weights
from .masks import PruneSpec, make_masks
from .schedule import MaskCallback, _plain_stack


@dataclass(frozen=True)
class AdmmSchedule:
    stages: int = 3               # densities on a geometric path from the start model's to the target
    admm_epochs: int = 40         # per stage: the penalty on, Z/U renewed every ``update_every`` epochs
    retrain_epochs: int = 60      # between stages: after the hard projection, masked training only
    rho: float = 1e-3             # ρ at each stage's first renewal
    rho_growth: float = 1.3       # ρ multiplied by this at every later renewal
    update_every: int = 3

    def __post_init__(self):
        if self.stages < 1 or self.admm_epochs < 1 or self.retrain_epochs < 0 or self.update_every < 1:
            raise ValueError(f"need stages >= 1, admm_epochs >= 1, retrain_epochs >= 0 and update_every >= 1 "
                             f"(got {self.stages}, {self.admm_epochs}, {self.retrain_epochs}, {self.update_every})")
        if self.rho <= 0 or self.rho_growth < 1:
            raise ValueError(f"need rho > 0 and rho_growth >= 1 (got {self.rho}, {self.rho_growth})")

    @property
    def epochs(self) -> int:
        """Epochs until the last stage's hard projection; the row's fine-tuning is that stage's retraining."""
        return self.stages * self.admm_epochs + (self.stages - 1) * self.retrain_epochs


class ADMMCallback(MaskCallback):
    """Prune ``state.model`` to ``target_density`` by progressive ADMM (see the module docstring).
    From ``schedule.epochs`` on the final mask stays enforced, as after a ramp."""

    def __init__(self, spec: PruneSpec, target_density: float, schedule: AdmmSchedule):
        super().__init__(spec, target_density, schedule.epochs)
        if spec.granularity != "unstructured":
            raise ValueError(f"ADMM here projects single weights: it needs granularity 'unstructured', "
                             f"not {spec.granularity!r}")
        self.schedule = schedule
        self.z = self.u = None    # per weight, while a stage's penalty is on
        self.rho = schedule.rho

    def stage_density(self, stage: int) -> float:
        return self.d0 * (self.target / self.d0) ** ((stage + 1) / self.schedule.stages)

    def before_epoch(self, state):
        s = self.schedule
        stage, e = divmod(state.epoch, s.admm_epochs + s.retrain_epochs)
        weights = prunable_weights(state.model)
        if stage < s.stages:
            if e < s.admm_epochs and e % s.update_every == 0:
                self._renew(weights, self.stage_density(stage), first=e == 0)
            elif e == s.admm_epochs:  # hard projection; ``apply`` below zeroes the rest and its momentum
                self.masks = make_masks(weights, self.stage_density(stage), self.spec,
                                        chain=_plain_stack(state.model))
                self.z = self.u = None
        self.apply(state)
        state.metrics["density"] = self.density()
        if self.z is not None:
            state.metrics["rho"] = self.rho
            state.metrics["admm_gap"] = self.gap(weights)

    @torch.no_grad()
    def _renew(self, weights: dict, density: float, first: bool):
        names = list(self.masks)
        w = [weights[n].detach().float() for n in names]
        if first:
            self.rho, self.u = self.schedule.rho, [torch.zeros_like(t) for t in w]
        target = {n: a + b for n, a, b in zip(names, w, self.u)}
        keep = make_masks(target, density, self.spec)
        self.z = [target[n] * keep[n] for n in names]
        if not first:
            # U scaled by 1/ρ: when ρ grows, the unscaled dual ρ·U must stay as it was.
            grown = self.rho * self.schedule.rho_growth
            self.u = [(u + a - z) * (self.rho / grown) for u, a, z in zip(self.u, w, self.z)]
            self.rho = grown
        # Stored in each weight's layout (channels_last in training) so the per-step update stays fused.
        self.z = [torch.empty_like(weights[n]).copy_(z) for n, z in zip(names, self.z)]
        self.u = [torch.empty_like(weights[n]).copy_(u) for n, u in zip(names, self.u)]

    def after_step(self, state):
        super().after_step(state)
        if self.z is None:
            return
        k = state.optimizer.param_groups[0]["lr"] * self.rho
        params = self._lists[0]  # bound by ``apply`` in super().after_step
        with torch.no_grad():  # W − k·(W − Z + U) in place: no per-step allocation of weight-sized tensors
            torch._foreach_mul_(params, 1 - k)
            torch._foreach_add_(params, self.z, alpha=k)
            torch._foreach_add_(params, self.u, alpha=-k)

    @torch.no_grad()
    def gap(self, weights: dict) -> float:
        """‖W − Z‖ / ‖W‖: how far the weights still are from the sparse set (0 once they lie in it)."""
        w = [weights[n].detach().float() for n in self.masks]
        num = sum(float((a - z.float()).pow(2).sum()) for a, z in zip(w, self.z))
        return (num / max(sum(float(a.pow(2).sum()) for a in w), 1e-30)) ** 0.5

    def state_dict(self):
        d = super().state_dict()
        d["rho"] = self.rho
        if self.z is not None:
            d["z"], d["u"] = [z.cpu() for z in self.z], [u.cpu() for u in self.u]
        return d

    def load_state_dict(self, d):
        super().load_state_dict(d)
        self.rho, self.z, self.u = d["rho"], d.get("z"), d.get("u")

    def _bound(self, model, optimizer):
        out = super()._bound(model, optimizer)
        if self.z is not None and self.z[0].device != out[0][0].device:  # restored on the CPU
            self.z = [torch.empty_like(p).copy_(z) for p, z in zip(out[0], self.z)]
            self.u = [torch.empty_like(p).copy_(u) for p, u in zip(out[0], self.u)]
        return out
