"""CUP (Duggal et al., arXiv 1911.08630): cluster the filters of each prunable layer and keep one
representative per cluster, with one global threshold t (cup.md §1).

Per layer l, filter i is described by its incoming weights (layer l) and its outgoing weights
(layer l+1, the consumer of its output): per-kernel L2 norms for convolutions, raw signed rows and
columns for linear layers, plus the bias when ``use_bias`` (VGG only). No normalisation: t is an
absolute Euclidean distance in weight-norm units (quirk Q2). Ward linkage, the dendrogram cut at
height t (or at a cluster count, manual mode), and per cluster the member whose whole feature
vector has the largest L2 norm (lowest index on ties). Layers are processed in depth order, so a
layer's incoming features see the already-pruned previous layer (Q5).
"""
from dataclasses import dataclass

import numpy as np
import torch
from scipy.cluster.hierarchy import fcluster, linkage


@dataclass(frozen=True)
class Pair:
    """A prunable layer, its BatchNorm (None for the MLP) and the layer consuming its output."""
    layer: str
    bn: str | None
    next: str


def pairs_for(model) -> list[Pair]:
    """Prunable layers per model, in depth order (cup.md §1.9)."""
    name = model.arch["name"]
    if name in ("vgg16", "vgg16_cup"):
        convs = [f"features.{i}" for i, m in enumerate(model.features) if isinstance(m, torch.nn.Conv2d)]
        return [Pair(c, f"features.{int(c.split('.')[1]) + 1}", n) for c, n in zip(convs, convs[1:] + ["classifier"])]
    if name == "mlp":
        return [Pair("fc1", None, "fc2"), Pair("fc2", None, "fc3")]
    out = []
    for s in range(1, model.num_stages + 1):
        for b in range(len(getattr(model, f"layer{s}"))):
            p = f"layer{s}.{b}"
            out.append(Pair(f"{p}.conv1", f"{p}.bn1", f"{p}.conv2"))
            if name == "resnet50":  # the Bottleneck's 3x3 is prunable too; conv3 feeds the residual
                out.append(Pair(f"{p}.conv2", f"{p}.bn2", f"{p}.conv3"))
    if not out:
        raise ValueError(f"CUP has no prunable-layer rule for {name!r}")
    return out


def features(w: torch.Tensor, b: torch.Tensor | None, w_next: torch.Tensor) -> np.ndarray:
    """Feature matrix [n_filters, d] of layer l from its weight, optional bias and the next weight."""
    w, w_next = w.detach().float().cpu(), w_next.detach().float().cpu()
    incoming = w.flatten(2).norm(dim=2) if w.dim() == 4 else w                 # [n, C_in]
    outgoing = (w_next.flatten(2).norm(dim=2) if w_next.dim() == 4 else w_next).T  # [n, C_out(l+1)]
    if w.dim() == 4 and w_next.dim() == 2:
        outgoing = outgoing.abs()  # conv→linear with fm = 1: the per-neuron L2 norm of one weight
    parts = [incoming, outgoing] + ([b.detach().float().cpu()[:, None]] if b is not None else [])
    return torch.cat(parts, 1).double().numpy()


def check_multiple(multiple: int):
    """The width-rounding option's one rule, checked where it is taken (CupSS before training starts)."""
    if multiple < 1:
        raise ValueError(f"multiple must be >= 1 (1: no rounding), got {multiple}")


def rounded_width(k: int, multiple: int, full: int) -> int:
    """``k`` filters rounded up to a multiple of ``multiple`` (tensor cores: 8), at most the layer's
    ``full`` width. Used by CUP's finer cut (``cluster_keep``) and by zero padding (``speed.pad_widths``)."""
    check_multiple(multiple)
    return min(-(-k // multiple) * multiple, full)


def cluster_keep(f: np.ndarray, *, t: float | None = None, n_keep: int | None = None,
                 multiple: int = 1) -> np.ndarray:
    """Sorted indices of the kept filters: one max-norm representative per Ward cluster.

    ``multiple`` (our extension, automatic mode): the cut at t gives k clusters; the same dendrogram
    is then cut into the next multiple of ``multiple`` clusters (at most all n filters), so the width
    suits tensor cores (8 for bf16) with real filters instead of zero padding. The finer cut only
    splits clusters, and a cluster's max-norm member stays the max-norm member of the part holding
    it, so every filter kept at t is still kept.
    """
    n = len(f)
    if (t is None) == (n_keep is None):
        raise ValueError("give exactly one of t (automatic mode) or n_keep (manual mode)")
    check_multiple(multiple)
    if multiple > 1 and t is None:
        raise ValueError(f"multiple > 1 only with t (manual mode sets the counts itself); got {multiple}")
    if n == 1:
        return np.zeros(1, dtype=np.int64)
    z = linkage(f, method="ward", metric="euclidean")
    labels = (fcluster(z, t, criterion="distance") if t is not None
              else fcluster(z, min(max(n_keep, 1), n), criterion="maxclust"))
    k = labels.max()  # fcluster numbers its clusters 1..k
    if (wanted := rounded_width(k, multiple, n)) > k:
        labels = fcluster(z, wanted, criterion="maxclust")
    norms = np.linalg.norm(f, axis=1)
    keep = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        keep.append(members[np.argmax(norms[members])])  # argmax takes the lowest index on ties
    return np.sort(np.array(keep, dtype=np.int64))
