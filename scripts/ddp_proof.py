"""Proof that ``fit`` under torchrun trains the same model as one process with the same global batch.

    python scripts/ddp_proof.py --out runs/ddp_proof            # 2 GPUs (NCCL), bf16
    python scripts/ddp_proof.py --out runs/ddp_proof --fp32     # float32: a tight comparison
    python scripts/ddp_proof.py --out /tmp/ddp_proof --cpu      # 2 CPU processes (gloo)

It writes a synthetic ImageFolder, then runs one short training twice through the same code
(``imagenet.make_loaders`` + ``train.fit`` + a ``CupSS`` callback): once in a single process with
global batch B, once under ``torchrun --nproc_per_node=N`` with B/N per rank. CUP-SS is set to
prune once, at the start of epoch 2 (t_e = T·(e − 1): epoch 1 rebuilds the model unchanged, epoch
2 removes filters and meets the budget of "fewer FLOPs than dense"), so the architecture changes
mid-run. The single process runs with ``bn_splits=N``: BatchNorm then normalises each 1/N of the
batch on its own, as each GPU does under DDP, so both runs compute the same function and their
per-step losses may differ only by floating-point rounding. Checked and written to ``--out``
(``ddp_proof.md``, ``ddp_proof.json``): the per-step loss curves agree within the tolerance, every
rank holds the same architecture and bit-identical weights after the pruning event and at the
end, the evaluation is identical on every rank, and the pruned architecture equals the single
process's. Exit status 1 if any check fails.
"""
import argparse
import dataclasses
import hashlib
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402

from elastictrain import distributed, imagenet  # noqa: E402
from elastictrain.cup import CupSS  # noqa: E402
from elastictrain.cup.cifar import layer_widths  # noqa: E402
from elastictrain.flops import count_flops  # noqa: E402
from elastictrain.models import create_model  # noqa: E402
from elastictrain.train import Callback, TrainConfig, fit  # noqa: E402

# Relative per-step loss tolerance. Both runs do the same arithmetic (per-part forward and backward,
# gradients summed and scaled by powers of two, which is exact), so with the same kernels the
# losses differ only by how the logged mean is rounded: 1.2e-7 measured on 2 CPU processes, fp32.
# bf16 leaves more room for a kernel that differs between processes to be amplified.
TOLERANCE = {"fp32": 1e-4, "bf16": 1e-2}


@dataclass(frozen=True)
class ProofConfig:
    data: str
    out: str
    ranks: int = 2              # the DDP world size; the single-process run uses bn_splits = ranks
    model: str = "resnet18"
    epochs: int = 3
    batch: int = 32             # global
    image_size: int = 64
    prune_t: float = 0.6        # t at epoch 2 (epoch 1: t = 0)
    lr: float = 0.05
    fp32: bool = False
    cpu: bool = False
    workers: int = 2
    seed: int = 0


class StepLog(Callback):
    """The loss of every step over the global batch (the mean of the ranks' local means)."""

    def __init__(self):
        self.losses, self.archs = [], []

    def after_step(self, state):
        self.losses.append(distributed.all_reduce_sum([state.loss.item()])[0] / distributed.world_size())

    def after_epoch(self, state):
        self.archs.append(state.model.arch)


def state_sha256(model) -> str:
    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def worker(cfg: ProofConfig) -> dict:
    """One rank of the DDP run, or (without a process group) the single-process reference.
    Writes ``<out>/<tag>.json`` and ``<out>/<tag>.pt`` (final state_dict) and returns the record."""
    device = distributed.init_distributed("cpu" if cfg.cpu else None)
    world, rank = distributed.world_size(), distributed.rank()
    # The same kernels in both runs: autotuning may pick different ones per process, and early in
    # training a 1e-7 difference grows to percents within ~10 steps, hiding what is compared here.
    torch.backends.cudnn.deterministic = True
    torch.use_deterministic_algorithms(True, warn_only=True)
    if cfg.fp32:  # float32 proper: no TF32 convolutions or matmuls
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    train_loader, val_loader = imagenet.make_loaders(cfg.data, batch_size=cfg.batch // world,
                                                     image_size=cfg.image_size, workers=cfg.workers,
                                                     seed=cfg.seed, device=device)
    torch.manual_seed(cfg.seed)
    model = create_model(cfg.model, num_classes=len(train_loader.dataset.classes))
    ss = CupSS(cfg.prune_t, b=0.0, offset=1, max_flops=count_flops(model) - 1)
    log = StepLog()
    train = TrainConfig(epochs=cfg.epochs, lr=cfg.lr, nesterov=False, weight_decay=1e-4, schedule="constant",
                        seed=cfg.seed, amp=not cfg.fp32, bn_splits=cfg.ranks if world == 1 else 1)
    started = time.perf_counter()
    model, history = fit(model, train_loader, val_loader, train, callbacks=[ss, log], device=device,
                         progress=False)
    tag = "single" if world == 1 else f"rank{rank}"
    record = {"tag": tag, "world": world, "device": str(device), "losses": log.losses, "archs": log.archs,
              "stopped_at": ss.stopped_at, "widths": layer_widths(model)["kept"].tolist(),
              "original_widths": layer_widths(model)["original"].tolist(),
              "test_top1": history["test_top1"].tolist(), "state_sha256": state_sha256(model),
              "fit_s": round(time.perf_counter() - started, 1)}
    Path(cfg.out).mkdir(parents=True, exist_ok=True)
    if rank == 0:  # for the weight comparison with the single process (the ranks compare by hash)
        torch.save({k: v.cpu() for k, v in model.state_dict().items()}, Path(cfg.out) / f"{tag}.pt")
    (Path(cfg.out) / f"{tag}.json").write_text(json.dumps(record))
    distributed.cleanup()
    return record


def compare(single: dict, ranks: list[dict], tolerance: float, out=None) -> dict:
    """The checks of the proof, from the records ``worker`` wrote."""
    a, b = torch.tensor(single["losses"], dtype=torch.float64), torch.tensor(ranks[0]["losses"], dtype=torch.float64)
    n = min(len(a), len(b))  # equal unless something is badly wrong (then losses_match fails)
    diff = (a[:n] - b[:n]).abs()
    rel = diff / a[:n].abs().clamp_min(1e-12)
    result = {
        "steps": len(a), "steps_ddp": len(b), "max_abs_loss_diff": float(diff.max()),
        "max_rel_loss_diff": float(rel.max()), "tolerance_rel": tolerance,
        "first_loss": float(a[0]), "last_loss": float(a[-1]),
        "pruned_at_epoch": single["stopped_at"],
        "kept_filters": f"{sum(single['widths'])}/{sum(single['original_widths'])}",
        "losses_match": len(a) == len(b) and bool(rel.max() <= tolerance),
        "loss_logged_identically_on_ranks": all(r["losses"] == ranks[0]["losses"] for r in ranks),
        "archs_identical_across_ranks": all(r["archs"] == ranks[0]["archs"] for r in ranks),
        "weights_identical_across_ranks": len({r["state_sha256"] for r in ranks}) == 1,
        "eval_identical_across_ranks": all(r["test_top1"] == ranks[0]["test_top1"] for r in ranks),
        "arch_matches_single_process": ranks[0]["archs"] == single["archs"],
        "architecture_changed_mid_run": (single["stopped_at"] == 2 and single["archs"][0] != single["archs"][1]
                                         and sum(single["widths"]) < sum(single["original_widths"])),
    }
    if out is not None and result["arch_matches_single_process"]:
        s, r = torch.load(Path(out) / "single.pt"), torch.load(Path(out) / "rank0.pt")
        # Floating-point tensors only: the BatchNorm step counters of the single process count each part.
        result["max_abs_weight_diff"] = max(float((s[k].double() - r[k].double()).abs().max())
                                            for k in s if s[k].is_floating_point())
    result["passed"] = all(v for k, v in result.items() if k.startswith(("losses_", "loss_", "archs_", "weights_",
                                                                        "eval_", "arch_", "architecture_")))
    return result


def markdown(cfg: ProofConfig, result: dict, single: dict, ranks: list[dict], wall_s: float) -> str:
    precision = "float32" if cfg.fp32 or cfg.cpu else "bf16 autocast"
    lines = [f"# DDP proof: {cfg.ranks} ranks vs one process ({'PASSED' if result['passed'] else 'FAILED'})", "",
             f"{cfg.model}, synthetic ImageFolder at {cfg.image_size} px, global batch {cfg.batch} "
             f"({cfg.batch // cfg.ranks} per rank), {cfg.epochs} epochs, lr {cfg.lr}, {precision} on "
             f"{ranks[0]['device']} (ranks) / {single['device']} (single process, bn_splits={cfg.ranks}); "
             f"CUP-SS prunes at epoch 2 (t = {cfg.prune_t}). Wall time {wall_s:.0f} s.", "",
             "| check | result |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in result.items()]
    lines += ["", "| step | single-process loss | DDP loss |", "|---|---|---|"]
    lines += [f"| {i + 1} | {x:.6f} | {y:.6f} |" for i, (x, y) in enumerate(zip(single["losses"], ranks[0]["losses"]))]
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--fp32", action="store_true")
    p.add_argument("--cpu", action="store_true", help="gloo on CPU processes instead of NCCL on GPUs")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--per-class", type=int, default=48)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batch", type=int, default=32, help="global batch")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--prune-t", type=float, default=ProofConfig.prune_t)
    p.add_argument("--lr", type=float, default=ProofConfig.lr)
    p.add_argument("--worker", help=argparse.SUPPRESS)  # a ProofConfig as JSON: run one worker
    args = p.parse_args(argv)
    if args.worker:
        worker(ProofConfig(**json.loads(args.worker)))
        return
    started = time.perf_counter()
    out = args.out.resolve()
    data = imagenet.make_synthetic_imagefolder(out / "data", classes=args.classes, per_class=args.per_class,
                                               size=args.image_size + 16)
    cfg = ProofConfig(str(data), str(out), ranks=args.ranks, epochs=args.epochs, batch=args.batch,
                      image_size=args.image_size, prune_t=args.prune_t, lr=args.lr, fp32=args.fp32, cpu=args.cpu)
    env = {**os.environ, "NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
           "CUBLAS_WORKSPACE_CONFIG": ":4096:8"}  # deterministic cuBLAS
    env.pop("RANK", None), env.pop("WORLD_SIZE", None)
    me, spec = str(Path(__file__).resolve()), json.dumps(dataclasses.asdict(cfg))
    print("single process ...", flush=True)
    # One thread per process, as torchrun gives each rank: CPU kernels then split their sums the same way.
    subprocess.run([sys.executable, me, "--out", str(out), "--worker", spec], check=True,
                   env={**env, "OMP_NUM_THREADS": "1"} if args.cpu else env)
    print(f"torchrun, {args.ranks} ranks ...", flush=True)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.ranks}",
                    me, "--out", str(out), "--worker", spec], check=True, env=env)
    single = json.loads((out / "single.json").read_text())
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(args.ranks)]
    result = compare(single, ranks, TOLERANCE["fp32" if args.fp32 or args.cpu else "bf16"], out)
    for f in out.glob("*.pt"):  # ~45 MB each; the JSON records keep what was compared
        f.unlink()
    wall = time.perf_counter() - started
    report = markdown(cfg, result, single, ranks, wall)
    (out / "ddp_proof.md").write_text(report)
    (out / "ddp_proof.json").write_text(json.dumps({"config": dataclasses.asdict(cfg), "result": result,
                                                    "single": single, "ranks": ranks, "wall_s": wall}, indent=1))
    print(report)
    sys.exit(0 if result["passed"] else 1)


if __name__ == "__main__":
    main()
