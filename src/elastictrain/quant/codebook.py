"""Multi-codebook weight sharing with trained centroids (Deep Compression's mode A, spec §5.10;
mode B, latent weights that may change centroid, is ``latent``).

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

    def __init__(self, shape, positions, codes, n_entries):
        super().__init__()
        self.shape = tuple(shape)
        self.register_buffer("positions", positions)
        self.register_buffer("codes", codes)
        # members per codebook entry (at least 1): a buffer, so it follows the model to its device
        self.register_buffer("members", torch.bincount(codes, minlength=n_entries).clamp_min(1).float())

    def forward(self, codebook):
        vals = codebook.flatten()[self.codes]
        out = torch.zeros(int(np.prod(self.shape)), dtype=codebook.dtype, device=codebook.device)
        return out.scatter(0, self.positions, vals).view(self.shape)

    def right_inverse(self, codebook):
        return codebook  # the parametrized module's original *is* the codebook


def conv_and_linear(model: nn.Module) -> dict:
    """The modules owning each prunable weight, by weight name."""
    return {f"{n}.weight": m for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}


def check_grad(grad: str):
    if grad not in ("sum", "mean"):
        raise ValueError(f"grad must be 'sum' or 'mean', not {grad!r}")


def share_(mod: nn.Module, codebook: torch.Tensor, positions: torch.Tensor, codes: torch.Tensor, grad: str):
    """Re-parametrize ``mod.weight`` (on the codebook's device) as ``codebook.flatten()[codes]`` at
    ``positions``, the codebook its trainable parameter."""
    shared = SharedWeight(mod.weight.shape, positions, codes, codebook.numel())
    parametrize.register_parametrization(mod, "weight", shared, unsafe=True)
    mod.parametrizations.weight.original = nn.Parameter(codebook)
    if grad == "mean":
        mod.parametrizations.weight.original.register_hook(lambda g, s=shared: g / s.members.view_as(g))


def quantize_(model: nn.Module, spec: QuantSpec, seed: int = 0, grad: str = "sum") -> dict:
    """Share weights in place; returns the initial codebooks by weight name.

    ``grad="sum"``: a centroid's gradient is the sum of its members' (the true gradient, Deep
    Compression's). ``"mean"`` divides it by the member count, i.e. the step an SGD step on the free
    weights would take once projected onto "all members equal": a centroid of a 1000-member cluster
    then moves as far as one weight would, instead of 1000 times as far at the same learning rate.
    """
    check_grad(grad)
    return cluster_each_(model, spec, seed, lambda mod, book, pos, codes: share_(mod, book, pos, codes, grad))


def cluster_each_(model: nn.Module, spec: QuantSpec, seed: int, attach) -> dict:
    """k-means for every prunable weight (``build_codebook``), then ``attach(module, codebook,
    positions, codes)`` re-parametrizes its module, all on the weight's device: mode A (``share_``)
    or mode B (``latent.snap_``). Returns the initial codebooks by weight name."""
    books = {}
    modules = conv_and_linear(model)
    for name, w in prunable_weights(model).items():
        codebook, pos, codes = build_codebook(w, spec, seed)
        attach(modules[name], *(t.to(w.device) for t in (codebook, pos, codes)))
        books[name] = codebook
    model.quant_spec = spec
    return books


def codebooks(model: nn.Module) -> dict:
    """The current (trained) codebooks of a quantized model, by weight name: mode A's parameter, or
    the buffer that mode B's latent weights snap to (``latent.SnappedWeight``)."""
    return {f"{n}.weight": getattr(p[0], "codebook", p.original).detach().cpu()
            for n, m in model.named_modules() if parametrize.is_parametrized(m, "weight")
            for p in [m.parametrizations.weight]}


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


def group_table(model: nn.Module, structure: Structure):
    """One row per conv/linear weight: its codebook groups, the non-empty ones, and the distinct
    non-zero values per group (max, and how many groups hold 1, 2, … values)."""
    import pandas as pd
    rows = []
    for name, w in prunable_weights(model).items():
        u = unique_per_group(w, structure)
        row = {"layer": name, "groups": len(u), "non_empty": int((u > 0).sum()),
               "nonzeros": int((w != 0).sum()), "max_unique": int(u.max())}
        row.update({f"with_{k}": int((u == k).sum()) for k in range(1, int(u.max()) + 1)})
        rows.append(row)
    table = pd.DataFrame(rows).fillna(0)
    return table.astype({c: int for c in table.columns if c != "layer"})
