"""Figures the notebooks draw. Each returns the matplotlib Figure (nbval compares only its
``<Figure size …>`` text, so the layout of a figure must not depend on SMOKE). Figures are closed
before they are returned: the notebook displays the returned object once, and the inline backend
does not flush a second copy."""
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from .models.common import prunable_weights


def _short(name: str) -> str:
    return name.removesuffix(".weight")


def sparsity_bars(model, title="per-layer density"):
    """Non-zero fraction of each conv/linear weight (log scale: 1000× models sit near 1e-3)."""
    ws = prunable_weights(model)
    dens = [float((w != 0).float().mean()) for w in ws.values()]
    fig, ax = plt.subplots(figsize=(9, 3.2))
    ax.bar(range(len(dens)), dens, color="tab:blue")
    ax.set_xticks(range(len(dens)), [_short(n) for n in ws], rotation=60, ha="right", fontsize=7)
    ax.set_yscale("log")
    ax.set_ylabel("density (non-zero / weights)")
    ax.set_title(title)
    fig.tight_layout()
    plt.close(fig)
    return fig


def weight_histograms(model, cols=5, bins=60, centroids=None):
    """Histogram of the non-zero weights of each layer; ``centroids`` (name → values) are marked."""
    ws = prunable_weights(model)
    rows = -(-len(ws) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 1.9 * rows), squeeze=False)
    for ax in axes.flat[len(ws):]:
        ax.axis("off")
    for ax, (name, w) in zip(axes.flat, ws.items()):
        nz = w.detach().float().cpu().numpy().ravel()
        nz = nz[nz != 0]
        ax.hist(nz, bins=bins, color="tab:gray")
        for c in (centroids or {}).get(name, []):
            ax.axvline(float(c), color="tab:red", lw=0.8)
        ax.set_title(_short(name), fontsize=8)
        ax.tick_params(labelsize=6)
    fig.tight_layout()
    plt.close(fig)
    return fig


def training_curves(history: pd.DataFrame, title=""):
    """Loss and accuracy per epoch (train, and test where it was evaluated)."""
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3))
    h = history
    a.plot(h["epoch"], h["train_loss"], label="train")
    if "test_loss" in h:
        a.plot(h["epoch"], h["test_loss"], label="test")
    a.set_xlabel("epoch"), a.set_ylabel("loss"), a.legend()
    b.plot(h["epoch"], h["train_acc"], label="train")
    if "test_top1" in h:
        b.plot(h["epoch"], h["test_top1"], label="test")
    b.set_xlabel("epoch"), b.set_ylabel("top-1 %"), b.legend()
    b.set_ylim(max(0.0, float(np.nanmin(h.get("test_top1", h["train_acc"]))) - 5), 100)
    fig.suptitle(title)
    fig.tight_layout()
    plt.close(fig)
    return fig


def kept_kernels(model, title="kept k×k kernels per layer"):
    """Kernels with any non-zero weight over all kernels, per conv layer (kernel and pattern rows)."""
    ws = {n: w for n, w in prunable_weights(model).items() if w.dim() == 4}
    kept = [int(w.detach().flatten(2).ne(0).any(2).sum()) for w in ws.values()]
    total = [w.shape[0] * w.shape[1] for w in ws.values()]
    fig, ax = plt.subplots(figsize=(9, 3.2))
    x = np.arange(len(ws))
    ax.bar(x - 0.2, total, 0.4, label="all kernels", color="tab:gray")
    ax.bar(x + 0.2, kept, 0.4, label="kept", color="tab:orange")
    ax.set_xticks(x, [_short(n) for n in ws], rotation=60, ha="right", fontsize=7)
    ax.set_yscale("log")
    ax.legend()
    ax.set_title(title)
    fig.tight_layout()
    plt.close(fig)
    return fig


def kept_filters(table, title="filters kept per layer"):
    """Original vs kept width of each pruned layer (CUP's non-uniform pattern)."""
    fig, ax = plt.subplots(figsize=(max(4, 0.45 * len(table) + 2), 3.2))
    x = np.arange(len(table))
    ax.bar(x - 0.2, table["original"], 0.4, label="original", color="tab:gray")
    ax.bar(x + 0.2, table["kept"], 0.4, label="kept", color="tab:green")
    ax.set_xticks(x, list(table["layer"]), rotation=60, ha="right", fontsize=7)
    ax.legend()
    ax.set_title(title)
    fig.tight_layout()
    plt.close(fig)
    return fig


def dendrogram(features, n_keep=None, t=None, title="Ward dendrogram", last=30):
    """The layer's Ward tree (truncated to its last merges) with the cut: at t, or between the
    merges that leave ``n_keep`` clusters."""
    from scipy.cluster.hierarchy import dendrogram as draw, linkage
    z = linkage(features, method="ward")
    if t is None and n_keep is not None:
        n = len(features)
        t = (z[n - n_keep - 1, 2] + z[n - n_keep, 2]) / 2 if 1 < n_keep < n else z[-1, 2]
    fig, ax = plt.subplots(figsize=(8, 3.2))
    draw(z, truncate_mode="lastp", p=last, ax=ax, no_labels=True, color_threshold=t)
    if t is not None:
        ax.axhline(t, color="tab:red", lw=1)
    ax.set_ylabel("Ward merge height")
    ax.set_title(title)
    fig.tight_layout()
    plt.close(fig)
    return fig
