"""CUP and CUP-SS on ImageNet (cup.md §2.7): the ResNet-18/34/50 rows with the paper's figures, and
the three runs behind ``scripts/train_imagenet.py`` (dense base, CUP + retraining, CUP-SS).

ImageNet is not available to this repository, so no row here has been reproduced: the notebooks
(17–19) print the paper's figures and, in smoke mode, run this code on a tiny synthetic
ImageFolder; their full mode launches the torchrun job below on a machine that has ImageNet.

Recipe (cup.md §2.1): SGD momentum 0.9, no Nesterov, weight decay 1e-4 on every parameter, lr 0.1
× 0.1 at epochs 30 and 60, 90 epochs, global batch 256 (the paper's, DataParallel over 3 GPUs),
every run (dense, each CUP retraining, each CUP-SS run) from lr 0.1 with a fresh optimiser: the lr
is a function of the step here, so the original's leaking of a decayed lr into later runs (Q17)
cannot happen. Accuracy: the final epoch in float32 on the whole val split; the paper's figure is
the best val epoch (Q9), reported beside it from the per-epoch evaluations.
"""
import dataclasses
import json
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .. import checkpoints, distributed, imagenet
from ..accuracy import evaluate
from ..flops import count_flops, count_params, reduction
from ..models import create_model
from ..storage import save_compressed
from ..train import TrainConfig, fit
from .cifar import best_epoch, layer_widths
from .single_shot import CupSS
from .surgery import cup_prune, find_t

REPO = Path(__file__).resolve().parents[3]  # a checkout: scripts/train_imagenet.py is there
TRAIN = TrainConfig(epochs=90, lr=0.1, momentum=0.9, nesterov=False, weight_decay=1e-4, schedule="step",
                    milestones=(30, 60), checkpoint_every=1)
BATCH = 256
# CUP-SS stops once the model is within these FLOPs (cup.md §1.11, our counter at 224 px).
FLOPS_BUDGET = {"resnet18": 2_120_000_000, "resnet34": 4_340_000_000, "resnet50": 3_810_000_000}


@dataclass(frozen=True)
class DenseRow:
    id: str
    model: str
    paper_top1: float
    paper_top5: float
    paper_gflops: float


@dataclass(frozen=True)
class ImagenetCupRow:
    """CUP at the paper's ``t`` on the trained dense model, then 90 epochs of retraining."""
    id: str
    model: str
    t: float
    paper_top1: float
    paper_top5: float
    paper_gflops: float
    paper_fr: float                      # FLOPs(base) / FLOPs(pruned), exact (cup.md §2.7)
    paper_before: tuple | None = None    # top-1 / top-5 before retraining, where printed
    paper_fr_readme: float | None = None  # the README's ratio of rounded GFLOPs, where it differs
    source: str = "notebook"             # "notebook": a cell printed it; "markdown only" (Q18)


@dataclass(frozen=True)
class ImagenetCupSSRow:
    """CUP-SS from random initialisation: t_e = k·(e − offset) + b before every epoch e until FLOPs
    ≤ max_flops (Q12: offset 1 for ResNet-50, 0 for ResNet-18/34; epoch 1 prunes random weights at t = b)."""
    id: str
    model: str
    b: float
    paper_top1: float
    paper_top5: float
    paper_gflops: float
    paper_fr: float
    k: float = 0.03
    paper_fr_readme: float | None = None
    source: str = "notebook"

    @property
    def offset(self) -> int:
        return 1 if self.model == "resnet50" else 0

    @property
    def max_flops(self) -> int:
        return FLOPS_BUDGET[self.model]


BASES = {r.model: r for r in [
    DenseRow("R18-base", "resnet18", 69.88, 89.26, 3.64),
    DenseRow("R34-base", "resnet34", 73.59, 91.44, 7.34),
    DenseRow("R50-base", "resnet50", 75.87, 92.87, 8.21),
]}
MD = "markdown only"
ROWS = {r.id: r for r in [
    ImagenetCupRow("R18-CUP-0.80", "resnet18", 0.80, 68.88, 88.47, 2.077, 1.75, (0.29, 0.94)),
    ImagenetCupRow("R18-CUP-0.825", "resnet18", 0.825, 68.29, 88.15, 1.970, 1.85, (0.28, 0.92)),
    ImagenetCupSSRow("R18-SS-0.3", "resnet18", 0.3, 67.38, 87.86, 2.089, 1.74),
    ImagenetCupSSRow("R18-SS-0.4", "resnet18", 0.4, 66.86, 87.37, 1.92, 1.89, source=MD),
    ImagenetCupSSRow("R18-SS-0.5", "resnet18", 0.5, 67.24, 87.59, 1.99, 1.83, source=MD),
    ImagenetCupRow("R34-CUP-0.60", "resnet34", 0.60, 72.73, 90.91, 4.117, 1.78, (0.62, 2.58)),
    ImagenetCupRow("R34-CUP-0.65", "resnet34", 0.65, 71.99, 90.47, 3.534, 2.08, (0.30, 2.02)),
    ImagenetCupRow("R34-CUP-0.675", "resnet34", 0.675, 71.65, 90.21, 3.20, 2.29, source=MD),
    ImagenetCupRow("R34-CUP-0.70", "resnet34", 0.70, 71.15, 90.08, 2.88, 2.55, source=MD),
    ImagenetCupSSRow("R34-SS-0.3", "resnet34", 0.3, 71.98, 90.42, 4.30, 1.71, source=MD),
    ImagenetCupSSRow("R34-SS-0.4", "resnet34", 0.4, 71.69, 90.28, 4.274, 1.72),
    ImagenetCupRow("R50-CUP-0.65", "resnet50", 0.65, 75.07, 92.30, 3.761, 2.18, (0.16, 0.86)),
    ImagenetCupRow("R50-CUP-0.675", "resnet50", 0.675, 74.73, 92.14, 3.53, 2.33, paper_fr_readme=2.32, source=MD),
    ImagenetCupRow("R50-CUP-0.70", "resnet50", 0.70, 74.60, 92.06, 3.335, 2.46, (0.14, 0.73), paper_fr_readme=2.47),
    ImagenetCupRow("R50-CUP-0.725", "resnet50", 0.725, 74.42, 91.74, 3.11, 2.64, source=MD),
    ImagenetCupSSRow("R50-SS-0.3", "resnet50", 0.3, 74.40, 91.99, 3.744, 2.19, paper_fr_readme=2.20),
    ImagenetCupSSRow("R50-SS-0.4", "resnet50", 0.4, 74.31, 92.10, 3.80, 2.16, source=MD),
    ImagenetCupSSRow("R50-SS-0.5", "resnet50", 0.5, 74.39, 91.94, 3.72, 2.21, source=MD),
]}


@dataclass(frozen=True)
class ImagenetRun:
    """Where and how big one run is; ``batch_size`` is global (split evenly over the ranks)."""
    data: Path
    out: Path
    train: TrainConfig = TRAIN
    batch_size: int = BATCH
    image_size: int = 224
    workers: int = 8
    find_t_iters: int = 40      # bisection steps on [0, 10] when CUP searches t for an FR: t to 1e-11

    def smoke(self) -> "ImagenetRun":
        """A few CPU steps on a synthetic folder at 64 px (notebooks in CI, tests)."""
        return dataclasses.replace(self, batch_size=8, image_size=64, workers=0, find_t_iters=12,
                                   train=dataclasses.replace(self.train, epochs=1))


def paper_table(model: str) -> pd.DataFrame:
    """The paper's rows for ``model`` (cup.md §2.7), base first."""
    base = BASES[model]
    rows = [{"row": base.id, "method": "dense", "t or k/b": "–", "before retrain": "–", "top-1": base.paper_top1,
             "top-5": base.paper_top5, "GFLOPs": base.paper_gflops, "FR": "1.00", "source": "notebook"}]
    for r in ROWS.values():
        if r.model != model:
            continue
        cup = isinstance(r, ImagenetCupRow)
        fr = f"{r.paper_fr:.2f}" + (f" (README {r.paper_fr_readme:.2f})" if r.paper_fr_readme else "")
        t = (f"t={r.t:.2f}" if round(r.t, 2) == r.t else f"t={r.t:.3f}") if cup else None  # as cup.md prints it
        rows.append({"row": r.id, "method": "CUP" if cup else "CUP-SS", "t or k/b": t or f"{r.k}/{r.b}",
                     "before retrain": ("–" if not cup or r.paper_before is None
                                        else f"{r.paper_before[0]:.2f} / {r.paper_before[1]:.2f}"),
                     "top-1": r.paper_top1, "top-5": r.paper_top5, "GFLOPs": r.paper_gflops, "FR": fr,
                     "source": r.source})
    return pd.DataFrame(rows)


def _loaders(run: ImagenetRun, device):
    world = distributed.world_size()
    if run.batch_size % world:
        raise ValueError(f"the global batch {run.batch_size} does not split over {world} ranks")
    return imagenet.make_loaders(run.data, batch_size=run.batch_size // world, image_size=run.image_size,
                                 workers=run.workers, seed=run.train.seed, device=device)


def _train_and_record(model, name: str, run: ImagenetRun, loaders, device, *, callbacks=(), record: dict,
                      progress=True) -> dict:
    """Train (resumably, ``out/.<name>.run``), measure the final model in float32 on the whole val split,
    and write ``<name>.pt`` (checkpoint), ``<name>.etm`` (shipped model) and ``<name>.json`` (summary)."""
    train_loader, val_loader = loaders
    run_state = run.out / f".{name}.run"
    model, history = fit(model, train_loader, val_loader, run.train, callbacks=callbacks, device=device,
                         checkpoint_path=run_state, progress=progress)
    final = evaluate(model, val_loader)
    flops, params = count_flops(model), count_params(model)
    fr, pr = reduction(model)
    best, best_e = best_epoch(history)
    ss = next((cb for cb in callbacks if isinstance(cb, CupSS)), None)
    if ss is not None:
        record = {**record, "stopped_at": ss.stopped_at}
    summary = {"name": name, **record, "model": model.arch["name"], "top1": final["top1"], "top5": final["top5"],
               "val_images": final["n"], "best_epoch_top1": best, "best_epoch": best_e, "flops": flops,
               "params": params, "fr": fr, "pr": pr,
               "widths": layer_widths(model)["kept"].tolist(), "epochs": len(history),
               "train_time_s": round(float(history["epoch_time_s"].sum()), 1),
               "world_size": distributed.world_size(), "global_batch": run.batch_size,
               "image_size": run.image_size, "classes": len(train_loader.dataset.classes),
               "torch": str(torch.__version__)}
    if distributed.is_main():
        run.out.mkdir(parents=True, exist_ok=True)
        records = json.loads(history.to_json(orient="records"))  # plain floats (and None for NaN)
        checkpoints.save_checkpoint(run.out / f"{name}.pt", model, epoch=len(history),
                                    extra={"summary": summary, "history": records})
        meta = {"row": name, "accuracy": round(final["top1"], 2), "test_images": final["n"], "ratio": summary["fr"],
                "dataset": "imagenet", **{k: v for k, v in summary.items() if k not in ("name", "widths")}}
        with np.errstate(over="ignore"):  # the writer tries fp16 for every tensor; large BN statistics overflow it
            save_compressed(model.cpu(), run.out / f"{name}.etm", meta)
        checkpoints.atomic_write(run.out / f"{name}.json", lambda f: f.write(json.dumps(summary, indent=1).encode()))
        run_state.unlink(missing_ok=True)
    distributed.barrier()
    return summary


def train_dense(model_name: str, run: ImagenetRun, *, name: str | None = None, device="cpu", progress=True) -> dict:
    """The dense base: ``model_name`` from random initialisation (seed ``run.train.seed``)."""
    loaders = _loaders(run, device)
    torch.manual_seed(run.train.seed)
    model = create_model(model_name, num_classes=len(loaders[0].dataset.classes))
    return _train_and_record(model, name or BASES[model_name].id, run, loaders, device,
                             record={"mode": "dense"}, progress=progress)


def cup(base_path, run: ImagenetRun, *, t: float | None = None, target_fr: float | None = None, name: str,
        device="cpu", progress=True) -> dict:
    """CUP on the dense model in ``base_path`` at ``t``, or at the smallest t reaching ``target_fr``
    (t is in the units of the trained weights, Q2), then the full retraining with a fresh optimiser."""
    if (t is None) == (target_fr is None):
        raise ValueError("give exactly one of t or target_fr")
    base, _ = checkpoints.build_from_checkpoint(base_path)
    if t is None:
        t, _ = find_t(base, target_fr, iters=run.find_t_iters)
    pruned, _ = cup_prune(base.eval(), t=t)
    loaders = _loaders(run, device)
    before = evaluate(pruned.to(device), loaders[1])  # the paper's "before retraining" (BN not recalibrated, Q7)
    record = {"mode": "cup", "t": t, "target_fr": target_fr, "base": str(base_path),
              "base_sha256": checkpoints.sha256_file(base_path),
              "before_retraining_top1": before["top1"], "before_retraining_top5": before["top5"]}
    return _train_and_record(pruned.train(), name, run, loaders, device, record=record, progress=progress)


def cupss(model_name: str, run: ImagenetRun, *, k: float, b: float, offset: int, max_flops: int, name: str,
          device="cpu", progress=True) -> dict:
    """CUP-SS from random initialisation; no retraining phase."""
    loaders = _loaders(run, device)
    torch.manual_seed(run.train.seed)
    model = create_model(model_name, num_classes=len(loaders[0].dataset.classes))
    ss = CupSS(k, b=b, offset=offset, max_flops=max_flops)
    return _train_and_record(model, name, run, loaders, device, callbacks=[ss], progress=progress,
                             record={"mode": "cupss", "k": k, "b": b, "offset": offset, "max_flops": max_flops})


def run_row(row_id: str, run: ImagenetRun, *, match: str = "fr", device="cpu", progress=True) -> dict:
    """A row at the paper's settings in this process (CUP at its FR or, ``match="t"``, at its t;
    CUP-SS at its k/b/offset/budget), training the dense base into ``run.out`` first where a CUP row
    needs it (smoke runs)."""
    row = ROWS.get(row_id)
    if row is None:
        return train_dense(next(b.model for b in BASES.values() if b.id == row_id), run, device=device,
                           progress=progress)
    if isinstance(row, ImagenetCupSSRow):
        return cupss(row.model, run, k=row.k, b=row.b, offset=row.offset, max_flops=row.max_flops, name=row_id,
                     device=device, progress=progress)
    base = run.out / f"{BASES[row.model].id}.pt"
    if not base.exists():
        train_dense(row.model, run, device=device, progress=progress)
    return cup(base, run, name=row_id, device=device, progress=progress,
               **({"target_fr": row.paper_fr} if match == "fr" else {"t": row.t}))


def torchrun_command(row_id: str, *, data, out, gpus: int, base=None, match: str = "fr") -> list[str]:
    """The full run of a row on one machine with ``gpus`` GPUs. A CUP row needs the dense ``base``
    checkpoint and retrains at the paper's FR (``match="fr"``, t searched on our weights, as the CIFAR
    rows do) or at the paper's t (``match="t"``)."""
    cmd = ["torchrun", "--standalone", f"--nproc_per_node={gpus}", "scripts/train_imagenet.py",
           "--data", str(data), "--out", str(out), "--row", row_id]
    row = ROWS.get(row_id)
    if isinstance(row, ImagenetCupRow):
        if base is None:
            raise ValueError(f"{row_id} retrains a dense model: pass base= (the {BASES[row.model].id} checkpoint)")
        cmd += ["--base", str(base)] + (["--target-fr", str(row.paper_fr)] if match == "fr" else [])
    return cmd


def launch(row_id: str, *, data, out, gpus: int, match: str = "fr") -> dict:
    """A row's full run (the notebooks' full mode): its torchrun job, printed and streamed here, unless
    ``<out>/<row>.json`` says it finished. A CUP row starts from ``<out>/<base row>.pt``."""
    if data is None:
        raise ValueError("a full run needs ImageNet: set IMAGENET to a folder with train/<class>/*.JPEG and "
                         "val/<class>/*.JPEG")
    out = Path(out).resolve()
    if not (out / f"{row_id}.json").exists():
        row = ROWS.get(row_id)
        base = out / f"{BASES[row.model].id}.pt" if isinstance(row, ImagenetCupRow) else None
        cmd = torchrun_command(row_id, data=data, out=out, gpus=gpus, base=base, match=match)
        print("$", " ".join(cmd), flush=True)
        with subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as p:
            for line in p.stdout:
                print(line, end="", flush=True)
        if p.returncode:
            raise subprocess.CalledProcessError(p.returncode, cmd)
    return json.loads((out / f"{row_id}.json").read_text())


def run_rows(rows, *, smoke: bool, data=None, out=None, gpus: int = 1, match: str = "fr") -> dict:
    """Every row of an ImageNet notebook, in order. Smoke mode runs a few CPU steps of each on a tiny
    synthetic ImageFolder in a scratch folder removed on return (accuracies mean nothing); full mode
    launches each row's torchrun job."""
    if not smoke:
        return {rid: launch(rid, data=data, out=out, gpus=gpus, match=match) for rid in rows}
    # A smoke row's files are read back only by later CUP rows (their dense base), and a ResNet-34's
    # checkpoint weighs 85 MB: kept to the end, notebook 19's filled the last of CI's disk. So each file
    # goes once no row left needs it, and the whole folder on return (the summaries are returned).
    with tempfile.TemporaryDirectory(prefix="smoke-imagenet-", dir=checkpoints.scratch_root()) as root:
        data = imagenet.make_synthetic_imagefolder(Path(root) / "data", classes=4, per_class=8, size=72)
        run = ImagenetRun(data, Path(root) / "out").smoke()
        results = {}
        for i, rid in enumerate(rows):
            results[rid] = run_row(rid, run, match=match, progress=False)
            needed = {f"{BASES[ROWS[r].model].id}.pt" for r in rows[i + 1:] if isinstance(ROWS.get(r), ImagenetCupRow)}
            for f in run.out.iterdir():
                if f.name not in needed:
                    f.unlink()
        return results

def results_table(results: dict) -> pd.DataFrame:
    """Ours (final epoch; best epoch labelled) beside the paper's figures (best epoch, Q9), per row."""
    out = []
    for rid, s in results.items():
        row = ROWS.get(rid) or next(b for b in BASES.values() if b.id == rid)
        before = getattr(row, "paper_before", None)
        out.append({"row": rid, "paper top-1": row.paper_top1, "ours top-1": round(s["top1"], 2),
                    "ours best ep": None if s["best_epoch_top1"] is None else round(s["best_epoch_top1"], 2),
                    "paper top-5": row.paper_top5, "ours top-5": round(s["top5"], 2),
                    "paper before": "–" if before is None else f"{before[0]:.2f} / {before[1]:.2f}",
                    "ours before": ("–" if "before_retraining_top1" not in s else
                                    f"{s['before_retraining_top1']:.2f} / {s['before_retraining_top5']:.2f}"),
                    "paper FR": getattr(row, "paper_fr", 1.0), "ours FR": round(s["fr"], 3),
                    "paper GFLOPs": row.paper_gflops, "ours GFLOPs": round(s["flops"] / 1e9, 3),
                    "ours params": s["params"], "ours t": round(s["t"], 4) if "t" in s else "–",
                    "ours train s": s["train_time_s"]})
    return pd.DataFrame(out)
