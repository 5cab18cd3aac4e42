"""1-D k-means for weight sharing.

Exact by dynamic programming over the sorted values (the optimum of Ckmeans.1d.dp) when a group
is small — every group at 1000× is (spec §5.10: ≤ ~1.8k non-zeros per layer, ≤ ~30 per workload
block) — else Lloyd's algorithm from quantile and k-means++ starts, keeping the best of the restarts.
"""
import numpy as np

EXACT_MAX = 2048  # the DP holds an n×n cost matrix: 32 MB of float64 at this size


def _exact(x: np.ndarray, k: int) -> np.ndarray:
    n = len(x)
    s1 = np.concatenate([[0.0], np.cumsum(x)])
    s2 = np.concatenate([[0.0], np.cumsum(x * x)])
    j = np.arange(n)[:, None]
    i = np.arange(n)[None, :]
    cnt = (i - j + 1).astype(float)
    with np.errstate(divide="ignore", invalid="ignore"):
        cost = (s2[i + 1] - s2[j]) - (s1[i + 1] - s1[j]) ** 2 / cnt  # SSE of x[j..i]
    cost[j > i] = np.inf
    d = cost[0].copy()                    # one cluster over x[0..i]
    splits = []
    for _ in range(1, k):
        prev = np.concatenate([[np.inf], d[:-1]])[:, None]  # best for x[0..j-1] with one cluster fewer
        total = prev + cost                                   # start the last cluster at j
        arg = total.argmin(0)
        d = total[arg, np.arange(n)]
        splits.append(arg)
    bounds, end = [], n - 1
    for arg in reversed(splits):          # walk the starts back from the end
        start = arg[end]
        bounds.append(start)
        end = start - 1
    starts = [0] + sorted(bounds)
    ends = starts[1:] + [n]
    return np.array([x[a:b].mean() for a, b in zip(starts, ends)])


def _lloyd(x: np.ndarray, k: int, rng, iters: int = 100, restarts: int = 8) -> np.ndarray:
    best, best_sse = None, np.inf
    for r in range(restarts):
        if r == 0:
            c = np.quantile(x, (np.arange(k) + 0.5) / k)
        else:  # k-means++
            c = [x[rng.integers(len(x))]]
            for _ in range(k - 1):
                d2 = np.min((x[:, None] - np.array(c)[None]) ** 2, axis=1)
                c.append(x[rng.choice(len(x), p=d2 / d2.sum())] if d2.sum() > 0 else x[rng.integers(len(x))])
            c = np.sort(np.array(c))
        for _ in range(iters):
            lab = np.abs(x[:, None] - c[None]).argmin(1)
            new = np.array([x[lab == j].mean() if (lab == j).any() else c[j] for j in range(k)])
            if np.allclose(new, c):
                break
            c = new
        sse = ((x - c[np.abs(x[:, None] - c[None]).argmin(1)]) ** 2).sum()
        if sse < best_sse:
            best, best_sse = np.sort(c), sse
    return best


def kmeans_1d(values, k: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(centroids, labels)``: at most k sorted centroids and each value's nearest one.
    With k or fewer distinct values the centroids are exactly those values (quantization is exact)."""
    x = np.asarray(values, dtype=np.float64)
    uniq = np.unique(x)
    if len(uniq) <= k:
        centroids = uniq
    elif len(x) <= EXACT_MAX:
        centroids = _exact(np.sort(x), k)
    else:
        centroids = _lloyd(x, k, np.random.default_rng(seed))
    labels = np.abs(x[:, None] - centroids[None]).argmin(1)
    return centroids, labels
