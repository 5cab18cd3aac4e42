"""ImageNet training for the CUP rows (cup.md §2.7), one process per GPU:

    torchrun --standalone --nproc_per_node=8 scripts/train_imagenet.py --data /data/imagenet \\
        --out runs/imagenet --row R50-base                          # dense ResNet-50, 90 epochs
    torchrun ... --row R50-CUP-0.70 --base runs/imagenet/R50-base.pt --target-fr 2.46   # or --t 0.70
    torchrun ... --row R50-SS-0.3                                   # CUP-SS, k/b/offset/budget of the row

``--row`` fills in the mode, model and the row's t or k/b/offset/FLOPs budget; without it give
``--mode`` and ``--model`` (and ``--t``/``--target-fr`` or ``--k``/``--b``/``--offset``/``--max-flops``).
``--batch-size`` is the global batch (split over the ranks). Every run resumes from
``<out>/.<name>.run`` when restarted, and writes ``<name>.pt`` (checkpoint), ``<name>.etm`` (the
model in the repository's file format) and ``<name>.json`` (its figures) into ``--out``.
Without torchrun it runs in one process (the first GPU, or the CPU).
"""
import argparse
import dataclasses
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from elastictrain import distributed, imagenet  # noqa: E402
from elastictrain.cup import imagenet as rows  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, type=Path, help="ImageFolder root with train/ and val/")
    p.add_argument("--out", required=True, type=Path, help="folder for checkpoints, models and summaries")
    p.add_argument("--row", choices=sorted([*rows.ROWS, *(b.id for b in rows.BASES.values())]))
    p.add_argument("--mode", choices=("dense", "cup", "cupss"))
    p.add_argument("--model", choices=sorted(rows.BASES))
    p.add_argument("--name", help="file stem of the outputs (default: the row id, or <model>-<mode>)")
    p.add_argument("--base", type=Path, help="cup: the dense checkpoint to prune")
    p.add_argument("--t", type=float, help="cup: the threshold (default: the row's, unless --target-fr)")
    p.add_argument("--target-fr", type=float, help="cup: search the smallest t reaching this FLOPs reduction")
    p.add_argument("--k", type=float, help="cupss: t_e = k·(e − offset) + b")
    p.add_argument("--b", type=float)
    p.add_argument("--offset", type=int)
    p.add_argument("--max-flops", type=float, help="cupss: stop pruning once FLOPs (at 224 px) are at most this")
    p.add_argument("--epochs", type=int, default=rows.TRAIN.epochs)
    p.add_argument("--milestones", type=int, nargs="*", default=list(rows.TRAIN.milestones))
    p.add_argument("--lr", type=float, default=rows.TRAIN.lr)
    p.add_argument("--batch-size", type=int, default=rows.BATCH, help="global batch (all ranks together)")
    p.add_argument("--image-size", type=int, default=224, help="training crop (smaller only for smoke runs)")
    p.add_argument("--workers", type=int, default=8, help="decoding processes per rank")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fp32", action="store_true", help="train in float32 instead of bf16 autocast")
    p.add_argument("--compile", help="torch.compile mode for the training forward")
    p.add_argument("--cpu", action="store_true", help="run on the CPU (gloo under torchrun)")
    p.add_argument("--synthetic", action="store_true",
                   help="first write a small synthetic ImageFolder at --data (trying the pipeline without ImageNet)")
    return p.parse_args(argv)


def resolve(args) -> dict:
    """Mode, model and method settings from --row, overridden by explicit flags."""
    row = rows.ROWS.get(args.row) or next((b for b in rows.BASES.values() if b.id == args.row), None)
    mode = args.mode or {rows.DenseRow: "dense", rows.ImagenetCupRow: "cup",
                         rows.ImagenetCupSSRow: "cupss"}.get(type(row))
    model = args.model or (row.model if row else None)
    if mode is None or model is None:
        sys.exit("give --row, or --mode and --model")
    spec = {"mode": mode, "model": model, "name": args.name or args.row or f"{model}-{mode}"}
    if mode == "cup":
        if args.base is None:
            sys.exit("--mode cup needs --base (the dense checkpoint)")
        t = args.t if args.t is not None or args.target_fr is not None else getattr(row, "t", None)
        if (t is None) == (args.target_fr is None):
            sys.exit("--mode cup needs exactly one of --t or --target-fr (a CUP --row supplies t)")
        spec.update(base=args.base, t=t, target_fr=args.target_fr)
    elif mode == "cupss":
        ss = row if isinstance(row, rows.ImagenetCupSSRow) else None
        spec.update(k=args.k if args.k is not None else getattr(ss, "k", None),
                    b=args.b if args.b is not None else getattr(ss, "b", None),
                    offset=args.offset if args.offset is not None else (1 if model == "resnet50" else 0),
                    max_flops=int(args.max_flops) if args.max_flops else rows.FLOPS_BUDGET[model])
        if spec["k"] is None or spec["b"] is None:
            sys.exit("--mode cupss needs --k and --b (a CUP-SS --row supplies them)")
    return spec


def main(argv=None):
    args = parse_args(argv)
    spec = resolve(args)
    device = distributed.init_distributed("cpu" if args.cpu else None)
    try:
        if args.synthetic and distributed.is_main() and not (args.data / "train").is_dir():
            imagenet.make_synthetic_imagefolder(args.data, classes=10, per_class=64, size=80)
        distributed.barrier()
        train = dataclasses.replace(rows.TRAIN, epochs=args.epochs, milestones=tuple(args.milestones), lr=args.lr,
                                    seed=args.seed, amp=not args.fp32, compile=args.compile)
        run = rows.ImagenetRun(args.data, args.out, train=train, batch_size=args.batch_size,
                               image_size=args.image_size, workers=args.workers)
        common = {"name": spec["name"], "device": device, "progress": distributed.is_main()}
        if distributed.is_main():
            print(f"{spec['name']}: {json.dumps({k: str(v) for k, v in spec.items()})} on {distributed.world_size()} "
                  f"rank(s) ({device}), global batch {args.batch_size}", flush=True)
        if spec["mode"] == "dense":
            summary = rows.train_dense(spec["model"], run, **common)
        elif spec["mode"] == "cup":
            summary = rows.cup(spec["base"], run, t=spec["t"], target_fr=spec["target_fr"], **common)
        else:
            summary = rows.cupss(spec["model"], run, k=spec["k"], b=spec["b"], offset=spec["offset"],
                                 max_flops=spec["max_flops"], **common)
        if distributed.is_main():
            print(json.dumps({k: v for k, v in summary.items() if k != "widths"}, indent=1), flush=True)
    finally:
        distributed.cleanup()


if __name__ == "__main__":
    main()
