"""Physical filter removal: the pruned network is an ordinary, smaller model built by
``create_model`` with per-layer widths, so ``load_compressed`` rebuilds it from its file alone.

For each prunable layer (in depth order) the kept filters K slice the layer's weight and bias, its
BatchNorm (affine and running statistics; the step counter restarts, quirk Q7) and the input
channels of the consuming layer. Residual-path tensors never change width (cup.md §1.9).
"""
import numpy as np
import pandas as pd
import torch

from ..models import create_model
from .cluster import features, cluster_keep, pairs_for

_BN_KEYS = ("weight", "bias", "running_mean", "running_var")


def _widths_kwargs(name: str, model, kept: dict) -> dict:
    pairs = pairs_for(model)
    if name == "mlp":
        return {"hidden": [kept["fc1"], kept["fc2"]]}
    if name == "resnet50":
        return {"widths": [[kept[a.layer], kept[b.layer]] for a, b in zip(pairs[::2], pairs[1::2])]}
    return {"widths": [kept[p.layer] for p in pairs]}


def cup_prune(model, *, t: float | None = None, keep: dict | None = None, use_bias: bool | None = None,
              faithful_bias_bug: bool = False, multiple: int = 1):
    """Prune ``model`` with CUP; returns ``(pruned_model, table)``. The original is not modified.

    Automatic mode: one global ``t``. Manual mode: ``keep`` maps layer name → filters kept (the
    MNIST experiment). ``use_bias`` defaults to CUP's per-model choice (True for VGG only, Q4).
    ``multiple`` (automatic mode, our extension): each layer keeps a multiple of it filters, or all of
    them (``cluster_keep``); 1 is CUP itself.
    ``faithful_bias_bug`` re-creates quirk Q1: with ``use_bias`` off, the pruned layer's bias is
    re-initialised instead of sliced (CUP's MNIST "before retraining" figures carry it).
    """
    if use_bias is None:
        use_bias = model.arch["name"].startswith("vgg16")

    def choose(p, w, bias, w_next):
        f = features(w, bias if use_bias else None, w_next)
        return cluster_keep(f, t=t, n_keep=None if keep is None else keep[p.layer], multiple=multiple)

    return _surgery(model, choose, sliced_bias=use_bias or not faithful_bias_bug)


def rank_prune(model, keep: dict, criterion: str, *, seed: int = 0):
    """The baselines CUP compares with (Li et al. 2017): keep, per layer, the ``keep[layer]`` filters
    with the largest L1 or L2 norm of [incoming weights, bias], or a seeded random choice."""
    if criterion not in ("l1", "l2", "random"):
        raise ValueError(f"criterion must be l1, l2 or random, not {criterion!r}")
    rng = np.random.default_rng(seed)

    def choose(p, w, bias, w_next):
        n = keep[p.layer]
        if criterion == "random":
            return np.sort(rng.permutation(w.shape[0])[:n])
        rows = torch.cat([w.flatten(1)] + ([bias[:, None]] if bias is not None else []), 1).float().cpu()
        score = rows.norm(p=1 if criterion == "l1" else 2, dim=1)
        return np.sort(score.argsort(descending=True)[:n].numpy())

    return _surgery(model, choose, sliced_bias=True)


def _surgery(model, choose, *, sliced_bias: bool):
    name = model.arch["name"]
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    rows, kept = [], {}
    for p in pairs_for(model):
        w, w_next = state[f"{p.layer}.weight"], state[f"{p.next}.weight"]
        bias = state.get(f"{p.layer}.bias")
        k = choose(p, w, bias, w_next)
        idx = torch.from_numpy(k).to(w.device)
        state[f"{p.layer}.weight"] = w[idx]
        if bias is not None:
            state[f"{p.layer}.bias"] = bias[idx] if sliced_bias else _fresh_bias(w[idx])
        if p.bn is not None:
            for key in _BN_KEYS:
                state[f"{p.bn}.{key}"] = state[f"{p.bn}.{key}"][idx]
            state[f"{p.bn}.num_batches_tracked"] = torch.zeros((), dtype=torch.long)
        state[f"{p.next}.weight"] = w_next[:, idx]
        kept[p.layer] = len(k)
        rows.append({"layer": p.layer, "original": w.shape[0], "kept": len(k)})
    kwargs = {**model.arch["kwargs"], **_widths_kwargs(name, model, kept)}
    pruned = create_model(name, **kwargs)
    pruned.load_state_dict(state, strict=True)
    table = pd.DataFrame(rows)
    table["fraction kept"] = table["kept"] / table["original"]
    return pruned.train(model.training), table


def _fresh_bias(w):
    bound = 1 / w[0].numel() ** 0.5  # torch's default Linear bias init, as the original's fresh layer had
    return torch.empty(w.shape[0]).uniform_(-bound, bound)


def find_t(model, target_fr: float, *, t_max: float = 10.0, iters: int = 40, multiple: int = 1
           ) -> tuple[float, float]:
    """The smallest t (to bisection precision) whose CUP model reaches ``target_fr`` FLOPs reduction.

    t is an absolute distance that depends on the trained weights (Q2), so the paper's t values do
    not transfer to another training run; its FLOPs reductions do. Returns ``(t, FR reached)``.
    ``multiple`` as in ``cup_prune``: rounded widths cost FLOPs, so the same FR needs a larger t.
    """
    from ..flops import count_flops

    base = count_flops(model)

    def fr(t):
        return base / count_flops(cup_prune(model, t=t, multiple=multiple)[0])

    if fr(t_max) < target_fr:
        raise ValueError(f"even t={t_max} reaches only FR {fr(t_max):.2f} < {target_fr}; raise t_max")
    lo, hi = 0.0, t_max
    for _ in range(iters):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if fr(mid) >= target_fr else (mid, hi)
    return hi, fr(hi)
