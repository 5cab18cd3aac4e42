"""Does CUP's FLOPs reduction buy wall-clock speed? Inference latency of a pruned model against
its unpruned architecture, on the same machine in the same process (the goal: speedup ≥ 0.7 × FR).

CPU at batch 1 (one request; per-layer call overhead weighs most there) and, where CUDA exists,
GPU at batch 512 (throughput; small pruned layers may leave the GPU idle). float32, eval mode,
median of repeated forwards (``metrics.latency_ms``). The two models alternate so that a clock
or load change affects both alike.
"""
import pandas as pd
import torch

from ..flops import reduction
from ..metrics import latency_ms
from ..models import create_model


def input_shape(model) -> tuple[int, int, int]:
    return (1, 28, 28) if model.arch["name"] == "mlp" else (3, 32, 32)


def compare(model, *, row: str = "", cpu_reps: int = 50, gpu_reps: int = 50, gpu_batch: int = 512,
            rounds: int = 3) -> dict:
    """Latencies (ms) of ``model`` and of the unpruned architecture, with FR and speedups."""
    dense = create_model(model.arch["name"]).eval()
    model = model.eval()
    shape = input_shape(model)
    fr = reduction(model)[0]
    out = {"row": row, "arch": model.arch["name"], "FR": fr}
    targets = [("cpu", 1, cpu_reps)] + ([("cuda", gpu_batch, gpu_reps)] if torch.cuda.is_available() else [])
    for device, batch, reps in targets:
        if device == "cuda":
            torch.backends.cudnn.benchmark = True
        d, p = [], []
        for _ in range(rounds):
            d.append(latency_ms(dense, shape, batch=batch, device=device, reps=reps))
            p.append(latency_ms(model, shape, batch=batch, device=device, reps=reps))
        key = f"{device.upper()} bs{batch}"
        out[f"{key} dense ms"], out[f"{key} pruned ms"] = min(d), min(p)
        out[f"{key} speedup"] = min(d) / min(p)
        out[f"{key} speedup/FR"] = out[f"{key} speedup"] / fr
        dense.cpu(), model.cpu()
    return out


def to_markdown(df: pd.DataFrame) -> str:
    """A GitHub table without the optional ``tabulate`` dependency."""
    def cell(v):
        return f"{v:.3f}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(df.columns) + " |", "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines)
