"""An exponential moving average of the weights, taken over the last part of training and loaded into
the model when training ends (Polyak averaging; "model weight averaging" in robust training, Gowal
et al. 2020). The shipped model is the average at the end of the run, not an epoch chosen on the test
set, so the final-model rule holds.

BatchNorm running statistics are averaged with the weights (as timm's ``ModelEmaV2`` does) rather than
re-estimated on clean images: in adversarial training the statistics the network was trained under
mix clean and adversarial batches, and a clean-only pass would shift them.

Masks: start the average after the last mask change (``PruneRecipe`` starts it at the end of the
ramp). From then on every step's pruned weights are exactly zero, and so is their average, so the
loaded model has the final masks bit for bit; an average taken across a mask change would not, and
``on_train_end`` refuses it.
"""
import torch

from .train import Callback


class WeightAverage(Callback):
    """``avg ← decay·avg + (1 − decay)·current`` after every optimiser step from ``start_epoch`` on
    (parameters and floating buffers); the average replaces the model's weights at the end.

    ``decay`` is per step: its horizon 1 / (1 − decay) steps should span a few epochs (0.999 ≈ 10
    epochs of 98 steps at batch 512 on CIFAR-10)."""

    def __init__(self, decay: float, start_epoch: int = 0):
        if not 0 < decay < 1 or start_epoch < 0:
            raise ValueError(f"need 0 < decay < 1 and start_epoch >= 0 (got {decay}, {start_epoch})")
        self.decay, self.start = decay, start_epoch
        self.avg: dict | None = None
        self.steps = 0                 # steps averaged so far
        self._bound_to, self._lists = None, None

    def _live(self, model) -> dict:
        return {k: v for k, v in model.state_dict().items() if v.dtype.is_floating_point}

    @torch.no_grad()
    def after_step(self, state):
        if state.epoch < self.start:
            return
        if self.avg is None:
            self.avg = {k: v.detach().clone() for k, v in self._live(state.model).items()}
        if self._bound_to is not state.model:
            live = self._live(state.model)
            if live.keys() != self.avg.keys():
                raise ValueError("the model's tensors changed while averaging (an architecture change, "
                                 "CUP-SS): start the average after the last one")
            if next(iter(self.avg.values())).device != next(iter(live.values())).device:  # restored on the CPU
                self.avg = {k: v.to(live[k].device) for k, v in self.avg.items()}
            self._bound_to, self._lists = state.model, (list(self.avg.values()), [live[k] for k in self.avg])
        torch._foreach_lerp_(*self._lists, 1 - self.decay)
        self.steps += 1

    @torch.no_grad()
    def on_train_end(self, state):
        if self.avg is None:
            raise ValueError(f"no step was averaged: training ended before start_epoch={self.start}")
        live = self._live(state.model)
        for k, v in live.items():
            a = self.avg[k].to(v.device)
            if k.endswith("weight") and v.ndim > 1 and bool(((v == 0) & (a != 0)).any()):
                raise ValueError(f"{k}: the average holds weights the final mask prunes; it began before "
                                 "the last mask change (start it after the pruning ramp)")
            v.copy_(a)

    def state_dict(self):
        d = {"steps": self.steps}
        if self.avg is not None:
            d["avg"] = {k: v.cpu() for k, v in self.avg.items()}
        return d

    def load_state_dict(self, d):
        self.steps, self.avg = d["steps"], d.get("avg")
        self._bound_to, self._lists = None, None
