"""CUP and CUP-SS on CIFAR-10 (cup.md §2.4–2.6): rows C2–C8, one frozen config per method.

CUP (``CupRow``): the trained dense model → one CUP pass at the t that reaches the paper's FLOPs
reduction (t is an absolute weight-norm distance, so the paper's t values do not transfer to our
weights; its FRs do: quirk Q2) → accuracy before retraining (and, our extra, after BatchNorm
recalibration) → a full-length retraining from the pruned weights with a fresh optimiser (Q8).

CUP-SS (``CupSSRow``): training from random initialisation with a CUP pass at t_e = k·(e − offset)
+ b before every epoch until the params or FLOPs budget is met (``CupSS``).

Both measure the final model in float32 on the full test set and ship it as
``TrainedModels/<row>.etm``; the best test-epoch figure (what the paper reports, Q9) comes from
the per-epoch bf16 evaluations and is returned beside it, labelled. Smoke mode shrinks everything
to a few CPU steps and writes only to temporary folders.
"""
import copy
import dataclasses
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from .. import baselines, checkpoints
from ..accuracy import evaluate, recalibrate_bn
from ..data import make_loaders
from ..evaluation import ship
from ..flops import count_flops, count_params, reduction
from ..models import create_model
from ..storage import load_compressed
from ..train import TrainConfig, default_device, fit
from .single_shot import CupSS
from .surgery import cup_prune, find_t

# Retraining recipes (our deviation from CUP's batch 64, step 0.1 → 0.001, wd 1e-4, best epoch:
# batch 64 does not fit the GPU budget). They are the dense recipes of notebook 00 at 160 epochs,
# which reached 93.8–94.0% (VGG16) and 94.3% (ResNet-56) at the final epoch. ResNet-56 is bound by
# kernel launches, so it trains under CUDA graphs ("reduce-overhead": 2.6x faster than eager).
VGG_RETRAIN = TrainConfig(epochs=160, lr=0.2, weight_decay=5e-4, label_smoothing=0.1)
RESNET_RETRAIN = TrainConfig(epochs=160, lr=0.2, weight_decay=5e-4, label_smoothing=0.1,
                             compile="reduce-overhead")
# CUP-SS: the paper's optimiser while pruning runs (SGD momentum 0.9, no Nesterov, wd 1e-4, lr x0.1
# at epochs 80 and 120), because wd sets the weight norms that t is measured in. The peak lr is
# doubled for our 8x (VGG16) / 4x (ResNet-56) larger batch, as the dense recipes use.
SS_TRAIN = TrainConfig(epochs=160, lr=0.2, nesterov=False, weight_decay=1e-4, schedule="step",
                       milestones=(80, 120), label_smoothing=0.1)

# The paper's figures per row beyond rows.ROWS (cup.md §2.4, §2.5): t or k, accuracy before
# retraining, params, FLOPs. None: not printed by the original notebooks.
PAPER = {
    "C2": {"t": 0.90, "before": 10.00, "params": 910_000, "flops": 214_580_000},
    "C3": {"t": 0.95, "before": 10.00, "params": 630_000, "flops": 171_730_000},
    "C4": {"k": 0.02, "before": None, "params": 870_714, "flops": 204_800_000},
    "C5": {"k": 0.035, "before": None, "params": 864_876, "flops": 199_400_000},
    "C6": {"t": 0.80, "before": 25.93, "params": None, "flops": 94_580_000},
    "C7": {"t": 0.825, "before": 21.85, "params": None, "flops": 84_450_000},
    "C8": {"k": 0.02, "before": None, "params": None, "flops": 119_710_000},
}


@dataclass(frozen=True)
class CupRow:
    row: str                    # rows.ROWS id; shipped as TrainedModels/<row>.etm
    base: str                   # baselines.DENSE key: the trained model CUP prunes
    target_fr: float            # the paper's FLOPs reduction at its t; we search our t for it
    paper_t: float              # the paper's t (reported beside ours, not used)
    train: TrainConfig          # the retraining run
    batch_size: int
    recalibration_batches: int = 50
    find_t_iters: int = 30      # bisection steps on [0, 10]: t to within 1e-8
    multiple: int = 1           # widths rounded up to multiples of it by a finer cut (cluster_keep); 1: CUP
    smoke_train_images: int = 256
    smoke_test_images: int = 200

    def smoke(self) -> "CupRow":
        return dataclasses.replace(self, batch_size=64, recalibration_batches=2, find_t_iters=12,
                                   train=dataclasses.replace(self.train, epochs=1, eval_every=0))


@dataclass(frozen=True)
class CupSSRow:
    row: str
    model: str                  # architecture trained from random init: "vgg16_cup" or "resnet56"
    dense: str                  # baselines.DENSE key whose training time CUP-SS is compared with
    k: float                    # t_e = k·(e − offset) + b (cup.md §1.11)
    train: TrainConfig
    batch_size: int
    max_params: int | None = None
    max_flops: int | None = None
    min_fr: float | None = None  # ours: the FLOPs budget as an FR of the unpruned model, beside max_params
    b: float = 0.0
    offset: int = 1
    wd_after_stop: float | None = None   # see CupSS; None keeps the paper's 1e-4 throughout
    multiple: int = 1           # every pass rounds widths up to multiples of it (CupSS); 1: CUP-SS
    teacher: str | None = None  # a baselines.DENSE key or a shipped row id to distil from (check_teacher); not in CUP
    smoke_train_images: int = 256
    smoke_test_images: int = 200

    def __post_init__(self):
        baselines.check_teacher(self.teacher, self.train)
        if self.min_fr is not None and (self.max_flops is not None or not self.min_fr > 1):
            raise ValueError(f"min_fr={self.min_fr}: give an FR above 1, and not beside max_flops (it sets max_flops)")

    def smoke(self) -> "CupSSRow":
        return dataclasses.replace(self, batch_size=64,
                                   train=dataclasses.replace(self.train, epochs=2, eval_every=0))


@dataclass
class CupResult:
    model: torch.nn.Module
    history: pd.DataFrame
    accuracy: float             # final epoch, float32, full (smoke: subset) test split
    summary: dict               # every figure the notebook prints (also in the file's meta)
    layers: pd.DataFrame        # per prunable layer: original and kept width
    path: Path


def _loaders(cfg, smoke, device, seed):
    return make_loaders("cifar10", batch_size=cfg.batch_size, seed=seed, device=device,
                        train_subset=cfg.smoke_train_images if smoke else None,
                        test_subset=cfg.smoke_test_images if smoke else None)


def _multiple_meta(multiple: int) -> dict:
    """The width rounding in a row's summary only when set, so plain CUP's and CUP-SS's files and
    printed summaries stay as they were."""
    return {"multiple": multiple} if multiple > 1 else {}


def _run_state(row, smoke) -> Path:
    folder = checkpoints.scratch_dir(f"smoke-{row}-run-") if smoke else checkpoints.checkpoints_dir()
    return folder / f".{row}.run"


def layer_widths(model) -> pd.DataFrame:
    """Original and kept width of every prunable layer of a (pruned) model."""
    from .cluster import pairs_for
    dense = dict(create_model(model.arch["name"]).named_modules())
    mods = dict(model.named_modules())
    return pd.DataFrame([{"layer": p.layer, "original": dense[p.layer].weight.shape[0],
                          "kept": mods[p.layer].weight.shape[0]} for p in pairs_for(model)])


def best_epoch(history: pd.DataFrame, after: int = 0) -> tuple[float | None, int | None]:
    """The highest per-epoch test accuracy (bf16 evaluation) at or after epoch ``after``: the
    paper's model selection on the test set (Q9), reported as such, never shipped."""
    h = history[history["epoch"] >= after].dropna(subset=["test_top1"]) if "test_top1" in history else None
    if h is None or h.empty:
        return None, None
    i = h["test_top1"].idxmax()
    return float(h.loc[i, "test_top1"]), int(h.loc[i, "epoch"])


def run_cup(cfg: CupRow, *, smoke: bool, device=None, progress=True) -> CupResult:
    device = torch.device(device or default_device())
    if smoke:
        cfg = cfg.smoke()
    dense = baselines.train_dense(baselines.DENSE[cfg.base], smoke=smoke, device=device, progress=False)
    train_loader, test_loader = _loaders(cfg, smoke, device, cfg.train.seed)
    base = dense.model.to(device).eval()
    t, fr_found = find_t(base, cfg.target_fr, iters=cfg.find_t_iters, multiple=cfg.multiple)
    pruned, layers = cup_prune(base, t=t, multiple=cfg.multiple)
    before = evaluate(pruned, test_loader)["top1"]
    # Our extra, not in the paper (Q7): the same pruned weights with re-estimated BN statistics.
    recal = evaluate(recalibrate_bn(copy.deepcopy(pruned), train_loader, cfg.recalibration_batches),
                     test_loader)["top1"]
    run_state = _run_state(cfg.row, smoke)
    model, history = fit(pruned, train_loader, test_loader, cfg.train, device=device,
                         checkpoint_path=run_state, progress=progress)
    accuracy = evaluate(model, test_loader)["top1"]
    fr, pr = reduction(model)
    best, best_e = best_epoch(history)
    summary = {"t": t, "paper_t": cfg.paper_t, "target_fr": cfg.target_fr, "fr": fr, "pr": pr,
               "params": count_params(model), "flops": count_flops(model),
               "before_retraining": before, "before_retraining_bn_recalibrated": recal,
               "best_epoch_accuracy": best, "best_epoch": best_e, "epochs": len(history),
               "train_time_s": round(float(history["epoch_time_s"].sum()), 1),
               "base": cfg.base, "base_sha256": dense.sha256, "base_accuracy": round(dense.accuracy, 2),
               **_multiple_meta(cfg.multiple)}
    if abs(fr - fr_found) > 1e-9 * fr:  # FR is of the unpruned architecture, as measure() derives it
        raise RuntimeError(f"FR of the retrained model {fr} differs from the searched one {fr_found}")
    path = ship(model, cfg.row, smoke=smoke, accuracy=accuracy, test_images=len(test_loader.labels), ratio=fr,
                dataset="cifar10", method="CUP", widths=layers["kept"].tolist(),
                device=baselines.environment()["device"], **_rounded(summary))
    run_state.unlink(missing_ok=True)
    return CupResult(model.cpu().eval(), history, accuracy, summary, layers, path)


def dense_training_time(name: str) -> dict | None:
    """Epochs, training seconds and GPU of the dense baseline's finished run in ``checkpoints/``, or
    None when it is not there (it is never trained just for this comparison)."""
    path = checkpoints.checkpoints_dir() / baselines.DENSE[name].checkpoint_name
    if not path.exists():
        return None
    extra = checkpoints.load_checkpoint(path)["extra"]
    h = pd.DataFrame(extra["history"])
    return {"epochs": len(h), "train_time_s": round(float(h["epoch_time_s"].sum()), 1),
            "s_per_epoch": float(h["epoch_time_s"].median()),
            "compile": baselines.DENSE[name].train.compile,
            "device": extra.get("device")}  # None: a checkpoint written before session 38 recorded it


def wall_time_line(name: str) -> str:
    """The dense baseline's training time, for CUP-SS's wall-time comparison (issue 5 asks for the same GPU),
    saying whether it trained on the GPU model this execution runs on."""
    d = dense_training_time(name)
    if d is None:
        return "no finished dense run in checkpoints/: no wall-time comparison in this execution"
    here = baselines.environment()["device"]
    where = ("its GPU not recorded, maybe another" if d["device"] is None
             else f"the same GPU model, {here}" if d["device"] == here
             else f"trained on {d['device']}, not this execution's {here}")
    return (f"dense {name} (notebook 00): {d['epochs']} epochs in {d['train_time_s']:.0f} s "
            f"({d['s_per_epoch']:.2f} s/epoch median, compile={d['compile']}; {where})")


def run_cupss(cfg: CupSSRow, *, smoke: bool, device=None, progress=True) -> CupResult:
    device = torch.device(device or default_device())
    if smoke:
        cfg = cfg.smoke()
    train_loader, test_loader = _loaders(cfg, smoke, device, cfg.train.seed)
    torch.manual_seed(cfg.train.seed)
    model = create_model(cfg.model)
    max_flops = cfg.max_flops if cfg.min_fr is None else int(count_flops(model) / cfg.min_fr)
    ss = CupSS(cfg.k, b=cfg.b, offset=cfg.offset, max_params=cfg.max_params, max_flops=max_flops,
               wd_after_stop=cfg.wd_after_stop, multiple=cfg.multiple)
    run_state = _run_state(cfg.row, smoke)
    teacher, teacher_accuracy = baselines.teacher_model(cfg.teacher, smoke=smoke, device=device)
    model, history = fit(model, train_loader, test_loader, cfg.train, callbacks=[ss], device=device,
                         checkpoint_path=run_state, progress=progress, teacher=teacher)
    accuracy = evaluate(model, test_loader)["top1"]
    fr, pr = reduction(model)
    best, best_e = best_epoch(history)
    best_after, best_after_e = best_epoch(history, after=ss.stopped_at or len(history) + 1)
    pruning = history["t"].dropna() if "t" in history else pd.Series(dtype=float)
    started = history.loc[history["params"] < history["params"].iloc[0], "epoch"]
    times = history["epoch_time_s"]
    summary = {"k": cfg.k, "b": cfg.b, "offset": cfg.offset, "max_params": cfg.max_params,
               "max_flops": max_flops, **({"min_fr": cfg.min_fr} if cfg.min_fr else {}), "stopped_at": ss.stopped_at,
               "t_at_stop": float(pruning.iloc[-1]) if ss.stopped_at else None,
               "first_pruned_epoch": int(started.iloc[0]) if len(started) else None,
               "fr": fr, "pr": pr, "params": count_params(model), "flops": count_flops(model),
               "best_epoch_accuracy": best, "best_epoch": best_e,
               "best_after_stop_accuracy": best_after, "best_after_stop_epoch": best_after_e,
               "epochs": len(history), "train_time_s": round(float(times.sum()), 1),
               "pruning_epochs_time_s": round(float(times[history["epoch"] <= (ss.stopped_at or len(history))].sum()), 1),
               "wd_after_stop": cfg.wd_after_stop, **_multiple_meta(cfg.multiple),
               **_teacher_meta(cfg, teacher_accuracy)}
    path = ship(model, cfg.row, smoke=smoke, accuracy=accuracy, test_images=len(test_loader.labels), ratio=fr,
                dataset="cifar10", method="CUP-SS", widths=layer_widths(model)["kept"].tolist(),
                device=baselines.environment()["device"], **_rounded(summary))
    run_state.unlink(missing_ok=True)
    return CupResult(model.cpu().eval(), history, accuracy, summary, layer_widths(model), path)


def run_cupss_rows(cfgs: list, *, smoke: bool, side_by_side: bool = False, report=None) -> dict[str, CupResult]:
    """A notebook's CUP-SS rows: one after the other, or side by side, each in a process of its own
    on the same device. At the paper's batch 64 the eager pruning epochs are bound by kernel launches
    on the host, not by the GPU, so two rows share one GPU at little cost (the timings are in
    benchmarks/results/cup_variants.md), and notebook 13 fits one 30-minute machine only side by
    side. Results are the same either way: each row seeds itself, and a row's model is its shipped file.
    ``report(row, result)`` is called for each row, in ``cfgs``' order, once the row is done (one
    after the other: before the next row starts, so a notebook prints each row's lines after its log)."""
    report = report or (lambda row, result: None)
    if not side_by_side or len(cfgs) < 2:
        results = {}
        for c in cfgs:
            results[c.row] = run_cupss(c, smoke=smoke)
            report(c.row, results[c.row])
        return results
    if smoke:  # the rows' files go to this process's scratch folder, which outlives the children
        checkpoints.scratch_root()
    # spawn, not fork: a forked child cannot use CUDA once the parent has touched it
    with ProcessPoolExecutor(len(cfgs), mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {c.row: pool.submit(_run_cupss_detached, c, smoke) for c in cfgs}
        results = {}
        for row, f in futures.items():
            r = f.result()
            results[row] = dataclasses.replace(r, model=load_compressed(r.path).eval())
            report(row, results[row])
    return results


def _run_cupss_detached(cfg, smoke):
    """``run_cupss`` in a child process; the model goes back through its file, not through a pipe."""
    return dataclasses.replace(run_cupss(cfg, smoke=smoke, progress=False), model=None)


def _teacher_meta(cfg: CupSSRow, accuracy) -> dict:
    """Distillation in a row's summary only when used, like ``_multiple_meta``."""
    if cfg.teacher is None:
        return {}
    return {"teacher": cfg.teacher, "teacher_accuracy": accuracy, "distill_alpha": cfg.train.distill_alpha,
            "distill_temperature": cfg.train.distill_temperature}


def _rounded(d: dict) -> dict:
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in d.items()}


def paper_table(results: dict) -> pd.DataFrame:
    """The paper's figures (best epoch) beside ours (final epoch; best epoch labelled as such)."""
    from ..rows import ROWS
    out = []
    for rid, r in results.items():
        s, row, paper = r.summary, ROWS[rid], PAPER[rid]
        best = s["best_epoch_accuracy"]
        out.append({"row": rid, "what": row.description, "paper acc (best ep)": row.paper_accuracy,
                    "ours final": round(r.accuracy, 2),
                    "ours best ep (test-picked)": None if best is None else round(best, 2),
                    "paper FR": row.paper_compression, "ours FR": round(s["fr"], 3), "ours PR": round(s["pr"], 2),
                    "paper params": paper["params"], "ours params": s["params"],
                    "paper FLOPs": paper["flops"], "ours FLOPs": s["flops"],
                    "meets": r.accuracy >= row.paper_accuracy and s["fr"] >= row.paper_compression})
    return pd.DataFrame(out)


def capacity_curves(history: pd.DataFrame, title=""):
    """CUP-SS: t, params and FLOPs per epoch (the capacity shrinking during training)."""
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(11, 2.8))
    for ax, col, label in zip(axes, ("t", "params", "flops"), ("t (pruning epochs)", "params", "FLOPs")):
        ax.plot(history["epoch"], history[col], marker=".", ms=3)
        ax.set_xlabel("epoch"), ax.set_ylabel(label)
        if col != "t":
            ax.set_yscale("log")
    fig.suptitle(title)
    fig.tight_layout()
    plt.close(fig)
    return fig


def shipped_extras(meta: dict) -> str:
    """What a shipped CUP / CUP-SS file recorded about its run, beside the paper's figures."""
    paper = PAPER.get(meta["row"], {})
    best = meta.get("best_epoch_accuracy")
    best_txt = ("none recorded" if best is None else
                f"{best:.2f}% at epoch {meta['best_epoch']} (test-picked, the paper's way; not the shipped model)")
    lines = []
    if meta.get("method") == "CUP":
        before = paper.get("before")
        lines += [f"  t (searched for the paper's FR) {meta['t']:.4f}   paper t {meta['paper_t']} (on the paper's weights)",
                  f"  before retraining {meta['before_retraining']:.2f}%"
                  + ("" if before is None else f" (paper {before:.2f}%)")
                  + f"; after BN recalibration (our extra, not in the paper) "
                    f"{meta['before_retraining_bn_recalibrated']:.2f}%",
                  f"  start: dense {meta['base']} {meta['base_accuracy']}% (sha256 {str(meta['base_sha256'])[:8]}…)"]
    else:
        after = meta.get("best_after_stop_accuracy")
        lines += [f"  k {meta['k']}: first filters removed at epoch {meta['first_pruned_epoch']}, pruning stopped at epoch "
                  f"{meta['stopped_at']} at t = {meta['t_at_stop']}",
                  "  best after the stop: " + ("none recorded" if after is None else
                                               f"{after:.2f}% at epoch {meta['best_after_stop_epoch']} (test-picked)")]
        if meta.get("min_fr"):  # only files of runs with min_fr record it, so older files print as they did
            params = [] if meta["max_params"] is None else [f"params <= {meta['max_params']:,}"]
            lines.append("  budgets: " + " and ".join(params + [f"FLOPs <= {meta['max_flops']:,}"])
                         + f" (FR >= {meta['min_fr']}, ours)")
    lines += [f"  best test epoch: {best_txt}",
              f"  paper: params {_n(paper.get('params'))}, FLOPs {_n(paper.get('flops'))}; ours: params {meta['params']:,}, "
              f"FLOPs {meta['flops']:,}, PR {meta['pr']:.2f}x",
              f"  run: {meta['epochs']} epochs, {meta['train_time_s']} s of training on {meta['device']}"]
    return "\n".join(lines)


def _n(v):
    return "not printed" if v is None else f"{v:,}"
