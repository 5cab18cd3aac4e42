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


def pattern_usage(supports: pd.DataFrame, title="kernels per pattern and layer"):
    """Stacked bars of ``metrics.kernel_supports``: how often each pattern serves each layer."""
    fig, (ax, lib) = plt.subplots(1, 2, figsize=(12, 3.4), gridspec_kw={"width_ratios": [4, 1]})
    bottom = np.zeros(len(supports))
    x = np.arange(len(supports))
    for i, code in enumerate(supports.columns[:12]):
        ax.bar(x, supports[code], bottom=bottom, label=f"p{i}", color=plt.cm.tab20(i))
        bottom += supports[code].to_numpy()
    ax.set_xticks(x, [_short(n) for n in supports.index], rotation=60, ha="right", fontsize=7)
    ax.set_yscale("log")
    ax.set_ylabel("kept kernels")
    ax.legend(fontsize=6, ncol=2)
    ax.set_title(title)
    n = min(len(supports.columns), 12)
    tiles = np.ones((3, 4 * n - 1)) * np.nan
    for i, code in enumerate(supports.columns[:n]):
        tiles[:, 4 * i:4 * i + 3] = [[(int(code) >> (3 * r + c)) & 1 for c in range(3)] for r in range(3)]
    lib.imshow(tiles, cmap="Greys", vmin=0, vmax=1)
    lib.set_xticks([4 * i + 1 for i in range(n)], [f"p{i}" for i in range(n)], fontsize=6)
    lib.set_yticks([])
    lib.set_title("the patterns")
    fig.tight_layout()
    plt.close(fig)
    return fig


def block_heatmap(counts: dict, title="non-zeros per 16×4 workload block"):
    """One row per layer, one column per block (``metrics.block_nonzeros``); a balanced model shows
    a single colour per row. Each row is divided by its own mean, so 1.0 everywhere is balance."""
    width = max(len(c) for c in counts.values())
    grid = np.full((len(counts), width), np.nan)
    for i, c in enumerate(counts.values()):
        c = c.float().cpu().numpy()
        grid[i, :len(c)] = c / max(c.mean(), 1e-12)
    fig, ax = plt.subplots(figsize=(10, 0.3 * len(counts) + 1.5))
    im = ax.imshow(grid, aspect="auto", cmap="coolwarm", vmin=0, vmax=2)
    ax.set_yticks(range(len(counts)), [f"{_short(n)} ({int(c[0])}/block)" if int(c.min()) == int(c.max())
                                       else f"{_short(n)} ({int(c.min())}–{int(c.max())})"
                                       for n, c in counts.items()], fontsize=7)
    ax.set_xlabel("block (filter group × channel group)")
    fig.colorbar(im, ax=ax, label="non-zeros / layer mean")
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


def codebook_histograms(start, quantized, cols=5, bins=60, title="non-zero weights before quantization; "
                        "red: the shared values after"):
    """Per layer: histogram of the start model's non-zero weights, with the quantized model's distinct
    non-zero values (its codebook, for one codebook per layer) marked. Same mask, so same counts."""
    ws, qs = prunable_weights(start), prunable_weights(quantized)
    rows = -(-len(ws) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 1.9 * rows + 0.4), squeeze=False)
    for ax in axes.flat[len(ws):]:
        ax.axis("off")
    for ax, (name, w) in zip(axes.flat, ws.items()):
        nz = w.detach().float().cpu().numpy().ravel()
        ax.hist(nz[nz != 0], bins=bins, color="tab:gray")
        q = qs[name].detach().float().cpu().numpy().ravel()
        values = np.unique(q[q != 0])
        for c in values:
            ax.axvline(float(c), color="tab:red", lw=0.7)
        ax.set_title(f"{_short(name)}: {len(values)} values", fontsize=8)
        ax.tick_params(labelsize=6)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    plt.close(fig)
    return fig


def block_codebooks(start, quantized, layer, structure, n_blocks=8, cols=4):
    """For one layer, its first ``n_blocks`` non-empty blocks of ``structure`` (e.g. WORKLOAD's 16×4
    grid): each block's start weights as dots on a line, its codebook values as red lines labelled
    with their member counts."""
    from .prune.structure import as_4d_shape, blocks
    w0 = prunable_weights(start)[layer].detach().float().cpu()
    wq = prunable_weights(quantized)[layer].detach().float().cpu()
    shape = as_4d_shape(w0.shape)
    b0, bq = blocks(w0.reshape(shape), structure), blocks(wq.reshape(shape), structure)
    ids = [g for g in range(len(bq)) if (bq[g] != 0).any()][:n_blocks]
    rows = -(-n_blocks // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.8 * cols, 1.5 * rows + 0.4), squeeze=False)
    for ax in axes.flat:
        ax.set_yticks([])
        ax.tick_params(labelsize=6)
    for ax in axes.flat[len(ids):]:
        ax.axis("off")
    for ax, g in zip(axes.flat, ids):
        nz = bq[g] != 0
        x0, xq = b0[g][nz].numpy(), bq[g][nz].numpy()
        ax.scatter(x0, np.zeros_like(x0), s=8, color="tab:gray", alpha=0.7)
        for c in np.unique(xq):
            ax.axvline(float(c), color="tab:red", lw=0.8)
            ax.text(float(c), 0.6, str(int((xq == c).sum())), color="tab:red", fontsize=6, ha="center")
        ax.set_ylim(-1, 1)
        ax.set_title(f"block {g}: {int(nz.sum())} weights, {len(np.unique(xq))} values", fontsize=7)
    fig.suptitle(f"{_short(layer)}: weights before (grey) and the block's codebook (red, member counts)", fontsize=9)
    fig.tight_layout()
    plt.close(fig)
    return fig
