"""Multi-codebook weight sharing with trained centroids (Deep Compression's mode A, spec §5.10).

A b-bit codebook holds 2^b **non-zero** values: zeros come from the sparsity mask, as ModelEval
checks ``unique(w[w != 0]) <= 2^b``. Codebook groups follow a ``Structure``: one per layer
(``LAYER``) or one per 16×4 workload block (``WORKLOAD``, "64 codebooks per layer").

``quantize_`` clusters each group's non-zeros and re-parametrizes every conv/linear weight as
``codebook[group, code]`` scattered into its non-zero positions: the mask cannot change, every
weight sits exactly on a centroid of its group, and autograd gives each centroid the sum of its
members' gradients. ``bake_`` writes the values back as plain weights.
"""
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from ..models.common import prunable_weights
from ..prune.structure import LAYER, Structure, block_ids
from .kmeans import kmeans_1d


@dataclass(frozen=True)
class QuantSpec:
    bits: int
    structure: Structure = LAYER

    def __post_init__(self):
        if not isinstance(self.bits, int) or not 1 <= self.bits <= 8:
            raise ValueError(f"bits must be an integer from 1 to 8, got {self.bits!r}")

    @property
    def levels(self) -> int:
        return 2 ** self.bits


def build_codebook(w: torch.Tensor, spec: QuantSpec, seed: int = 0):
    """k-means per group over the non-zero weights. Returns ``(codebook [G, K] float32,
    positions of the non-zeros (flat, ascending), their global code group*K + code)``."""
    flat = w.detach().float().cpu().flatten()
    pos = torch.nonzero(flat).flatten()
    groups = block_ids(tuple(w.shape), spec.structure).flatten()[pos]
    n_groups, k = spec.structure.num_blocks(tuple(w.shape)), spec.levels
    codebook = torch.zeros(n_groups, k)
    codes = torch.empty(len(pos), dtype=torch.int64)
    values = flat[pos].double().numpy()
    for g in torch.unique(groups).tolist():
        sel = (groups == g).numpy()
        centroids, labels = kmeans_1d(values[sel], k, seed)
        codebook[g, :len(centroids)] = torch.from_numpy(centroids).float()
        codebook[g, len(centroids):] = float(centroids[0])  # unused slots repeat a used value
        codes[torch.from_numpy(sel)] = torch.from_numpy(labels) + g * k
    return codebook, pos, codes


class SharedWeight(nn.Module):
    """Parametrization: the weight is ``codebook.flatten()[codes]`` at ``positions``, zero elsewhere."""

    def __init__(self, shape, positions, codes):
        super().__init__()
        self.shape = tuple(shape)
        self.register_buffer("positions", positions)
        self.register_buffer("codes", codes)

    def forward(self, codebook):
        vals = codebook.flatten()[self.codes]
        out = torch.zeros(int(np.prod(self.shape)), dtype=codebook.dtype, device=codebook.device)
        return out.scatter(0, self.positions, vals).view(self.shape)

    def right_inverse(self, codebook):
        return codebook  # the parametrized module's original *is* the codebook


def quantize_(model: nn.Module, spec: QuantSpec, seed: int = 0) -> dict:
    """Share weights in place; returns the initial codebooks by weight name."""
    books = {}
    modules = {f"{n}.weight": m for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    for name, w in prunable_weights(model).items():
        codebook, pos, codes = build_codebook(w, spec, seed)
        mod = modules[name]
        device = w.device
        parametrize.register_parametrization(
            mod, "weight", SharedWeight(w.shape, pos.to(device), codes.to(device)), unsafe=True)
        mod.parametrizations.weight.original = nn.Parameter(codebook.to(device))
        books[name] = codebook
    model.quant_spec = spec
    return books


def codebooks(model: nn.Module) -> dict:
    """The current (trained) codebooks of a quantized model, by weight name."""
    return {f"{n}.weight": m.parametrizations.weight.original.detach().cpu()
            for n, m in model.named_modules() if parametrize.is_parametrized(m, "weight")}


def bake_(model: nn.Module) -> nn.Module:
    """Replace every shared-weight parametrization by the plain weight it computes."""
    for m in model.modules():
        if parametrize.is_parametrized(m, "weight"):
            parametrize.remove_parametrizations(m, "weight", leave_parametrized=True)
    return model


def unique_per_group(w: torch.Tensor, structure: Structure) -> torch.Tensor:
    """Distinct non-zero values in each group (what ModelEval's codebook checks count)."""
    ids = block_ids(tuple(w.shape), structure).flatten()
    flat = w.detach().flatten().cpu()
    return torch.tensor([int(torch.unique(flat[(ids == g) & (flat != 0)]).numel())
                         for g in range(int(ids.max()) + 1)])
