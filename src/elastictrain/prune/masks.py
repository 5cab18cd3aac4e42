"""Mask makers: which weights survive at a given density, under a mixture of constraints.

Order of projections, coarse to fine (spec §5.7): items are either single weights (unstructured)
or whole k×k kernels (kernel, pattern); LAMP ranks items of all layers on one scale and the global
budget decides each layer's count (with floors, so no layer collapses at 1000×); a workload
``balanced`` structure then splits each layer's count equally over its blocks; a pattern
granularity finally keeps, inside each surviving kernel, the library pattern holding the most
energy. Budgets are counted in weights: a kernel costs k·k, a pattern kernel costs its m entries.

A balanced mask keeps only live entries: non-zero and, in a plain stack (``chain``), connected. A
kept weight that is zero and gets no gradient stays zero, so its block would hold fewer non-zeros
than its peers however balanced the mask is (row B1's conv1: 8–17 per block).
"""
import math
from dataclasses import dataclass

import torch

from .structure import Structure, as_4d_shape, blocks, unblocks


@dataclass(frozen=True)
class PruneSpec:
    granularity: str = "unstructured"      # unstructured | kernel | pattern
    balanced: Structure | None = None       # e.g. WORKLOAD: the same count in every block of a layer
    allocation: str = "lamp"                # lamp (global, scale-free) | erk (by layer shape) | uniform
    floors: bool = True                     # per-layer minimum counts (spec §5.2)

    def __post_init__(self):
        if self.granularity not in ("unstructured", "kernel", "pattern"):
            raise ValueError(f"granularity must be unstructured, kernel or pattern, not {self.granularity!r}")
        if self.allocation not in ("lamp", "erk", "uniform"):
            raise ValueError(f"allocation must be lamp, erk or uniform, not {self.allocation!r}")


def lamp(scores: torch.Tensor) -> torch.Tensor:
    """LAMP score of each entry: s_i / sum of the scores >= s_i in its layer (Lee et al. 2021).
    Scale-free, so layers whose magnitudes differ (BN makes them arbitrary) rank on one axis."""
    flat = scores.flatten()
    s, order = flat.sort()
    suffix = s.flip(0).cumsum(0).flip(0)
    out = torch.empty_like(flat)
    out[order] = s / suffix.clamp_min(torch.finfo(s.dtype).tiny)
    return out.view_as(scores)


def _floor(name: str, n_items: int, cost: int, first_conv: str, linear: bool) -> int:
    """Minimum items kept: conv >= max(32 weights, 0.02%), conv1 >= 10%, the classifier >= 5%."""
    frac = 0.10 if name == first_conv else 0.05 if linear else 0.0002
    weights = max(32, frac * n_items * cost)
    return min(n_items, max(1, math.ceil(weights / cost)))


def _erk_counts(scores: dict, costs: dict, budget: int, shapes: dict, floors: dict) -> dict[str, int]:
    """Erdős–Rényi-kernel budgets (RigL; spec §5.2's alternative): density ∝ (F + C + kh + kw) /
    (F·C·kh·kw), so each layer keeps ε·(F + C + kh + kw) weights, clamped between its floor and its
    live items (a positive score: a layer asked for more would keep zeros, picked by position, not
    by any merit), with ε set so the counts fill the budget; rounding remainders go to the largest
    fractional parts."""
    names = list(scores)
    lo = [floors[n] * costs[n] for n in names]
    hi = [int((scores[n] > 0).sum()) * costs[n] for n in names]
    want = [sum(shapes[n]) for n in names]
    if sum(hi) <= budget:
        return {n: h // costs[n] for n, h in zip(names, hi)}

    def filled(eps):
        return [min(max(eps * a, l), h) for a, l, h in zip(want, lo, hi)]
    low, high = 0.0, 1.0
    while sum(filled(high)) < budget:
        high *= 2
    for _ in range(200):  # bisection in float64: ends far below one weight of error
        mid = (low + high) / 2
        low, high = (mid, high) if sum(filled(mid)) < budget else (low, mid)
    target = filled(high)
    counts = {n: int(t // costs[n]) for n, t in zip(names, target)}  # t <= its layer's live weights
    spare = budget - sum(counts[n] * costs[n] for n in names)
    for i in sorted(range(len(names)), key=lambda i: target[i] / costs[names[i]] - counts[names[i]], reverse=True):
        n = names[i]
        if costs[n] <= spare and (counts[n] + 1) * costs[n] <= hi[i]:
            counts[n] += 1
            spare -= costs[n]
    return counts


def allocate(scores: dict, costs: dict, budget: int, spec: PruneSpec, linear=frozenset(),
             granules=None, shapes=None) -> dict[str, int]:
    """Items kept per layer so that sum(count * cost) <= budget (in weights); ``linear`` names the
    classifier-like layers (5% floor). With ``granules`` (a balanced spec's block count per layer)
    floors are rounded up to a multiple of it, so rounding a count down to whole blocks never
    breaks a floor. ``shapes`` (each layer's weight shape) is what ERK allocates by."""
    total = sum(s.numel() * costs[n] for n, s in scores.items())
    if spec.allocation == "uniform":
        return {n: max(1, int(s.numel() * budget / total)) for n, s in scores.items()}
    names = list(scores)
    granules = granules or {}
    floors = {n: _floor(n, s.numel(), costs[n], names[0], n in linear) if spec.floors else 1
              for n, s in scores.items()}
    floors = {n: min(scores[n].numel(), -(-f // granules.get(n, 1)) * granules.get(n, 1))
              for n, f in floors.items()}
    need = sum(floors[n] * costs[n] for n in names)
    if need > budget:
        why = ("the per-layer floors" if not granules else
               "the per-layer floors, rounded up to whole balance blocks (a layer with fewer than one "
               "per block cannot be balanced)")
        raise ValueError(f"a budget of {budget} weights cannot meet {why} ({need} weights); "
                         "lower the compression ratio, set floors=False or drop the balance constraint")
    if spec.allocation == "erk":
        if shapes is None or granules:
            raise ValueError("ERK allocation needs each layer's weight shape (make_masks passes them) and "
                             "no balance constraint")
        return _erk_counts(scores, costs, budget, shapes, floors)
    keys, item_costs, owners = [], [], []
    for i, n in enumerate(names):
        key = lamp(scores[n].float()).flatten()
        top = key.topk(floors[n]).indices
        key[top] = float("inf")  # floors first: the layer's strongest items always stay
        keys.append(key)
        item_costs.append(torch.full(key.shape, costs[n], dtype=torch.int64, device=key.device))
        owners.append(torch.full(key.shape, i, dtype=torch.int64, device=key.device))
    key, cost, owner = torch.cat(keys), torch.cat(item_costs), torch.cat(owners)
    order = key.argsort(descending=True)
    kept = order[cost[order].cumsum(0) <= budget]
    counts = torch.bincount(owner[kept], minlength=len(names)).tolist()
    return dict(zip(names, counts))


def per_kernel(t: torch.Tensor) -> torch.Tensor:
    """[F, C, kh, kw] -> [F, C], the mean over each kernel: how a kernel item is scored (of w², of |g|)."""
    return t.flatten(2).mean(2)


def whole_kernels(keep: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """A [F, C] bool over kernels as a mask shaped like the conv weight ``w``."""
    return keep[:, :, None, None].expand_as(w).clone()


def topk_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the k largest entries (ties broken by position, so exactly k)."""
    flat = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    flat[scores.flatten().topk(min(k, scores.numel())).indices] = True
    return flat.view_as(scores)


def balanced_topk_mask(scores: torch.Tensor, k: int, structure: Structure) -> torch.Tensor:
    """Keep the same number q of entries in each of the G blocks of ``structure``: q = k // G, or the
    live (positive-score) entries of the sparsest block if fewer (spec §5.6, strict option (b))."""
    b = blocks(scores, structure)
    g = b.shape[0]
    # The budget's rounding surplus lands on zero scores, which topk would take on ties: a block
    # short of live entries would be filled with weights that stay zero.
    live = int((b > 0).sum(1).min())
    q = min(k // g, live)
    if q < 1:
        raise ValueError(f"{k} kept entries cannot be balanced over {g} blocks of {tuple(scores.shape)} "
                         f"(fewer than one per block: {k // g} by the budget, {live} live in the sparsest "
                         "block); lower the ratio or drop the balance constraint")
    keep = torch.zeros_like(b, dtype=torch.bool)
    keep.scatter_(1, b.topk(q, dim=1).indices, True)
    return unblocks(keep, structure, scores.shape)


def unconnected(kept: dict) -> dict:
    """Per layer of a plain stack (``kept``: bool masks in data-flow order, each layer feeding only the
    next), a [F, C] bool: True where a weight cannot matter, because its filter feeds no kept weight
    of the next layer or its input channel comes from a filter of the previous layer with none kept."""
    feeds = [m.transpose(0, 1).flatten(1).any(1) for m in kept.values()]   # per input channel
    fed = [m.flatten(1).any(1) for m in kept.values()]                      # per filter
    out = {}
    for i, (n, m) in enumerate(kept.items()):
        f, c = m.shape[:2]
        out_dead = ~feeds[i + 1] if i + 1 < len(kept) else torch.zeros(f, dtype=torch.bool, device=m.device)
        in_dead = ~fed[i - 1] if i > 0 else torch.zeros(c, dtype=torch.bool, device=m.device)
        out[n] = out_dead[:, None] | in_dead[None, :]
    return out


def pattern_library(weights: dict, size: int = 8, entries: int = 4) -> torch.Tensor:
    """Mine the ``size`` most frequent k×k supports: each 3×3 kernel votes for its centre plus its
    ``entries``-1 largest other weights (PatDNN). Returns a bool [size, 9] library."""
    votes = []
    for w in weights.values():
        if w.dim() != 4 or w.shape[2:] != (3, 3):
            continue
        e = w.detach().flatten(0, 1).flatten(1).abs().float()  # [kernels, 9]
        e[:, 4] = float("inf")                                    # the centre is always kept
        top = e.topk(entries, dim=1).indices
        votes.append((torch.ones_like(top) << top).sum(1))       # support as a 9-bit code
    if not votes:
        raise ValueError("pattern pruning needs 3×3 conv layers; this model has none")
    codes, counts = torch.cat(votes).unique(return_counts=True)
    best = codes[counts.argsort(descending=True)[:size]]
    return ((best[:, None] >> torch.arange(9, device=best.device)) & 1).bool()


def make_masks(weights: dict, density: float, spec: PruneSpec, library: torch.Tensor | None = None,
               chain: bool = False) -> dict:
    """Masks (bool, shaped like each weight) keeping ``density`` of all the weights in ``weights``.

    ``chain``: ``weights`` is a plain stack in data-flow order (VGG, the MLP); a balanced mask then
    keeps no weight ``unconnected`` in the current weights (other specs ignore it: their masks stay
    as shipped). Judged once, on the weights: re-judged on the new masks, a filter emptied only by
    its block's competition would cut its readers, a cascade that can empty whole blocks."""
    if not 0 < density <= 1:
        raise ValueError(f"density must be in (0, 1], got {density}")
    budget = int(round(density * sum(w.numel() for w in weights.values())))
    if spec.granularity == "pattern" and library is None:
        raise ValueError("pattern granularity needs a pattern library (pattern_library(dense weights))")
    scores, costs = {}, {}
    for n, w in weights.items():
        e = w.detach().float() ** 2
        if spec.granularity == "unstructured" or w.dim() != 4:
            scores[n], costs[n] = e, 1                                 # linear layers stay per weight
        elif spec.granularity == "kernel":
            scores[n], costs[n] = per_kernel(e), w.shape[2] * w.shape[3]
        else:
            if w.shape[2:] != (3, 3):
                raise ValueError(f"{n}: pattern pruning needs 3×3 kernels, got {tuple(w.shape)}")
            energy = e.flatten(2) @ library.T.to(e)                    # [F, C, patterns]
            scores[n], costs[n] = energy.max(2).values / library.sum(1).max(), int(library.sum(1).max())
    granules = None if spec.balanced is None else {
        n: spec.balanced.num_blocks(s.shape if s.dim() == 4 else as_4d_shape(s.shape)) for n, s in scores.items()}
    if chain and spec.balanced is not None:
        cut = unconnected({n: w.detach() != 0 for n, w in weights.items()})
        scores = {n: s.masked_fill(cut[n].view(*cut[n].shape, *(1,) * (s.dim() - 2)), 0)
                  for n, s in scores.items()}
    counts = allocate(scores, costs, budget, spec, {n for n, w in weights.items() if w.dim() == 2}, granules,
                      {n: tuple(w.shape) for n, w in weights.items()})
    masks = {}
    for n, w in weights.items():
        s = scores[n]
        item_shape = as_4d_shape(s.shape) if s.dim() == 2 and w.dim() == 4 else s.shape
        s4 = s.reshape(item_shape)
        keep = (balanced_topk_mask(s4, counts[n], spec.balanced) if spec.balanced is not None
                else topk_mask(s4, counts[n])).reshape(s.shape)
        if s.dim() == w.dim():
            masks[n] = keep
        elif spec.granularity == "kernel":
            masks[n] = whole_kernels(keep, w)
        else:
            choice = (w.detach().float() ** 2).flatten(2) @ library.T.to(w.device, torch.float32)
            shape = library.to(w.device)[choice.argmax(2)]             # [F, C, 9] best pattern
            masks[n] = (shape & keep[:, :, None]).view_as(w)
    return masks
