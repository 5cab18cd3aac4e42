"""Inference latency of every shipped CUP model (TrainedModels/C*.etm) against its unpruned
architecture: CPU batch 1 and, when CUDA is available, GPU batch 512, float32, same machine and
process (elastictrain.cup.speed.compare). Prints the table beside each row's FLOPs reduction and
writes it to --out as CSV and markdown (the suffix is replaced by .csv and .md).

    python benchmarks/latency.py --out results/cup_latency [--dir TrainedModels] [--threads N]
        [--gpu-bf16] [--channels-last] [--pad-to 8] [--runtime onnxruntime [--ort-optimization extended]]

Run it on an otherwise idle machine: a GPU shared with training runs gives meaningless times.
"""
import argparse
import platform
from pathlib import Path

import pandas as pd
import torch

from elastictrain.cup.speed import RUNTIMES, compare, to_markdown
from elastictrain.evaluation import trained_models_dir
from elastictrain.serving import OPTIMIZATIONS
from elastictrain.storage import load_compressed


def onnxruntime_version() -> str:
    import onnxruntime
    return onnxruntime.__version__


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output path; .csv and .md are written beside it")
    p.add_argument("--dir", default=None, help="folder of .etm files (default: TrainedModels/)")
    p.add_argument("--pattern", default="C*.etm")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for batch 1 (default: torch's)")
    p.add_argument("--gpu-bf16", action="store_true", help="GPU under bf16 autocast, as the trainer runs")
    p.add_argument("--channels-last", action="store_true", help="both models and inputs in channels_last")
    p.add_argument("--pad-to", type=int, default=None,
                   help="time the pruned model with its widths zero-padded to this multiple (cup.speed.pad_widths)")
    p.add_argument("--runtime", choices=RUNTIMES, default="torch",
                   help="CPU column through PyTorch or ONNX Runtime (elastictrain.serving); GPU stays PyTorch")
    p.add_argument("--ort-optimization", choices=tuple(OPTIMIZATIONS), default="all",
                   help="ONNX Runtime's graph optimisation level; below 'all' there is no blocked NCHWc layout")
    p.add_argument("--reps", type=int, default=50)
    args = p.parse_args(argv)
    files = sorted(Path(args.dir or trained_models_dir()).glob(args.pattern))
    if not files:
        print(f"no {args.pattern} in {args.dir or trained_models_dir()}")
        return 1
    rows = [compare(load_compressed(f), row=f.stem, cpu_reps=args.reps, gpu_reps=args.reps, cpu_threads=args.threads,
                    gpu_bf16=args.gpu_bf16, channels_last=args.channels_last, pad_to=args.pad_to,
                    runtime=args.runtime, ort_optimization=args.ort_optimization) for f in files]
    df = pd.DataFrame(rows)
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    gpu_mode = "bf16 autocast" if args.gpu_bf16 else "float32"
    padding = f"pruned widths zero-padded to multiples of {args.pad_to}; " if args.pad_to else ""
    cpu_runtime = ("PyTorch" if args.runtime == "torch" else
                   f"ONNX Runtime {onnxruntime_version()}, optimisation level {args.ort_optimization}")
    header = (f"CPU: {platform.processor() or platform.machine()}, {args.threads or torch.get_num_threads()} of "
              f"{torch.get_num_threads()} threads, float32, {cpu_runtime}; GPU: {gpu}, {gpu_mode}; "
              f"{'channels_last; ' if args.channels_last else ''}{padding}torch {torch.__version__}; "
              f"median of {args.reps} forwards, best of 3 rounds")
    print(header)
    print(df.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(out.with_suffix(".csv"), index=False)
    out.with_suffix(".md").write_text(header + "\n\n" + to_markdown(df) + "\n")
    print("wrote", out.with_suffix(".csv"), out.with_suffix(".md"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
