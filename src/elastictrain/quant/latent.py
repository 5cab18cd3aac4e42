"""Quantization-aware training with latent weights, the spec's mode B (§5.10), handed on to mode A.

Mode A (``codebook.quantize_``) fixes every weight's centroid when k-means runs and trains only the
centroids: at 1000× a 4-bit layer keeps ~1,000 weights but trains 16 values, so fine-tuning wins
back what k-means cost (row 08 in session 8: 84.6% right after k-means, 88.35% after 40 epochs, from 88.41%) with
little freedom beyond that. Mode B keeps each non-zero weight as a latent float32 value: the
forward uses the nearest entry of its group's codebook, the backward passes the gradient straight
through to the latent value (STE), and before every epoch each codebook follows its latent weights
by Lloyd steps warm-started from the previous codebook. A weight can therefore change centroid as it
trains. ``LatentPhase`` runs mode B for the first epochs of ``fit`` and then freezes the assignments
into mode A for the rest: the spec's "mode B → A". Row 08 runs it (30 of 40 epochs, lr 0.003) and,
with the same dense teacher, landed where mode A did (88.34% against 88.35%, one run each, session 42).

Zeros stay zeros: only the mask's non-zeros are gathered, so a pruned weight's output is 0 and its
latent value gets no gradient.
"""
import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from ..train import Callback
from .codebook import QuantSpec, check_grad, cluster_each_, conv_and_linear, share_


def nearest(values: torch.Tensor, groups: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Index of the entry of ``codebook[group]`` nearest each value (the first of equals, so an
    unused slot that repeats a used value never wins)."""
    return (values[:, None] - codebook[groups]).abs().argmin(1)


class SnappedWeight(nn.Module):
    """Parametrization of the latent weight: in the forward each non-zero at ``positions`` takes the
    nearest entry of its group's codebook; in the backward its gradient reaches the latent value unchanged."""

    def __init__(self, shape, positions, groups, codebook):
        super().__init__()
        self.shape = tuple(shape)
        self.register_buffer("positions", positions)
        self.register_buffer("groups", groups)
        self.register_buffer("codebook", codebook)   # [G, K]; moved by ``recluster_``, not by the optimiser

    def _entries(self, values: torch.Tensor) -> torch.Tensor:
        return self.groups * self.codebook.shape[1] + nearest(values, self.groups, self.codebook)

    def codes(self, latent: torch.Tensor) -> torch.Tensor:
        """Each non-zero's entry in the flattened codebook (group·K + code): what mode A would fix."""
        return self._entries(latent.detach().flatten()[self.positions].float())

    def forward(self, latent):
        v = latent.flatten()[self.positions]   # gathered once per forward: the search reuses it
        q = self.codebook.flatten()[self._entries(v.detach().float())].to(v.dtype)
        # q + (v - v) is q to the bit (x - x is exactly 0), and its gradient with respect to v is 1.
        out = torch.zeros(latent.numel(), dtype=v.dtype, device=v.device)
        return out.scatter(0, self.positions, q + (v - v.detach())).view(self.shape)


def _snapped(model: nn.Module):
    """(name, module, its SnappedWeight) for every weight in mode B."""
    for name, mod in conv_and_linear(model).items():
        if parametrize.is_parametrized(mod, "weight") and isinstance(mod.parametrizations.weight[0], SnappedWeight):
            yield name, mod, mod.parametrizations.weight[0]


def snap_(model: nn.Module, spec: QuantSpec, seed: int = 0) -> dict:
    """Put every prunable weight in mode B, its codebooks from the k-means that starts mode A
    (``cluster_each_``); the current weights become the latent values. Returns the initial
    codebooks by weight name."""
    return cluster_each_(model, spec, seed, lambda mod, book, pos, codes: parametrize.register_parametrization(
        mod, "weight", SnappedWeight(mod.weight.shape, pos, codes // spec.levels, book), unsafe=True))


@torch.no_grad()
def recluster_(model: nn.Module, max_steps: int = 20):
    """Lloyd steps on every mode-B codebook over its current latent values, from the codebook as it
    is, until no entry moves (at most ``max_steps``). An entry left without members keeps its value."""
    for _, mod, snapped in _snapped(model):
        values = mod.parametrizations.weight.original.flatten()[snapped.positions].float()
        book = snapped.codebook.clone()
        n_groups, k = book.shape
        for _ in range(max_steps):
            slot = snapped.groups * k + nearest(values, snapped.groups, book)
            counts = torch.bincount(slot, minlength=n_groups * k)
            sums = torch.zeros(n_groups * k, device=values.device).index_add_(0, slot, values)
            new = torch.where(counts > 0, sums / counts.clamp_min(1), book.flatten()).view(n_groups, k)
            if torch.equal(new, book):
                break
            book = new
        snapped.codebook.copy_(book)


def assignments(model: nn.Module) -> dict:
    """Each mode-B weight's entries (``SnappedWeight.codes``), by weight name."""
    return {name: snapped.codes(mod.parametrizations.weight.original) for name, mod, snapped in _snapped(model)}


@torch.no_grad()
def freeze_(model: nn.Module, grad: str = "mean") -> dict:
    """Mode B → mode A: each weight keeps the entry it snaps to now, and the codebooks become the
    trained parameters (``grad`` as in ``quantize_``). The model's function does not change.
    Returns the codebooks by weight name."""
    check_grad(grad)
    books = {}
    for name, mod, snapped in list(_snapped(model)):
        codes = snapped.codes(mod.parametrizations.weight.original)
        book = snapped.codebook.clone()
        parametrize.remove_parametrizations(mod, "weight", leave_parametrized=False)
        share_(mod, book, snapped.positions, codes, grad)
        books[name] = book.cpu()
    return books


class LatentPhase(Callback):
    """``fit`` in mode B for its first ``epochs`` epochs, re-clustering before each, then in mode A
    (``freeze_``, a fresh optimiser for the codebooks). Adds the column ``changed_centroid``: the
    fraction of non-zeros that snap to another entry than at the previous epoch's start."""

    def __init__(self, epochs: int, grad: str = "mean"):
        if epochs < 0:
            raise ValueError(f"epochs of mode B must be >= 0, got {epochs}")
        check_grad(grad)
        self.epochs, self.grad, self.last = epochs, grad, None

    def before_epoch(self, state):
        if state.epoch < self.epochs:
            recluster_(state.model)
            codes = assignments(state.model)
            if self.last is not None:
                changed = sum(int((codes[n] != c).sum()) for n, c in self.last.items())
                state.metrics["changed_centroid"] = changed / sum(len(c) for c in codes.values())
            self.last = codes
        elif next(_snapped(state.model), None) is not None:   # the first epoch of mode A
            freeze_(state.model, self.grad)
            state.rebuild_optimizer()
            self.last = None
