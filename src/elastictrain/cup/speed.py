"""Does CUP's FLOPs reduction buy wall-clock speed? Inference latency of a pruned model against
its unpruned architecture, on the same machine in the same process (the goal: speedup ≥ 0.7 × FR).

CPU at batch 1 (one request; per-layer call overhead weighs most there) and, where CUDA exists,
GPU at batch 512 (throughput; small pruned layers may leave the GPU idle). float32, eval mode,
median of repeated forwards (``metrics.latency_ms``). The two models alternate so that a clock
or load change affects both alike.

Options, each applied to both models alike: ``cpu_threads`` (at batch 1 a many-core CPU splits
every small conv over all its threads, and the split's overhead, which pruning does not shrink,
dominates: one thread is the setting in which a serving process handles one request per core),
``gpu_bf16`` (the trainer's bf16 autocast), ``channels_last`` and ``pad_to`` (``pad_widths``: tensor
cores work in multiples of 8 channels, and CUP's widths, e.g. 31 or 3, are mostly not). Their column
names say which ran; speedup/FR divides by the FR of the file's own, unpadded widths. ``runtime``
picks PyTorch or ONNX Runtime for the CPU column (``serving``: at batch 1 ONNX Runtime's per-op cost
is a fraction of PyTorch's, so the dense baseline is faster too, 4× for ResNet-56).
"""
import contextlib

import pandas as pd
import torch

from .. import serving
from ..flops import reduction, unpruned
from ..metrics import latency_ms
from ..models import create_model, input_shape
from .cluster import pairs_for, rounded_width
from .surgery import _BN_KEYS, _widths_kwargs


def pad_widths(model, multiple: int = 8):
    """A copy of a CUP-pruned ``model`` whose prunable layers have zero filters appended up to a
    multiple of ``multiple``, computing the same function: a padded filter has zero weight and bias,
    its BatchNorm maps it to 0 (scale and shift 0, running mean 0 and variance 1), and the consuming
    layer reads it with zero weights. Never wider than the unpruned layer."""
    name = model.arch["name"]
    dense = dict(unpruned(model).named_modules())
    # load_state_dict below copies into the new model, so the input's tensors are never written.
    state = dict(model.state_dict())
    kept = {}
    for p in pairs_for(model):
        w = state[f"{p.layer}.weight"]
        n = w.shape[0]
        extra = rounded_width(n, multiple, dense[p.layer].weight.shape[0]) - n
        kept[p.layer] = n + extra
        if not extra:
            continue
        state[f"{p.layer}.weight"] = torch.cat([w, w.new_zeros((extra, *w.shape[1:]))])
        if f"{p.layer}.bias" in state:
            state[f"{p.layer}.bias"] = torch.cat([state[f"{p.layer}.bias"], w.new_zeros(extra)])
        if p.bn is not None:
            for key in _BN_KEYS:
                fill = 1.0 if key == "running_var" else 0.0
                state[f"{p.bn}.{key}"] = torch.cat([state[f"{p.bn}.{key}"], w.new_full((extra,), fill)])
        w_next = state[f"{p.next}.weight"]
        zeros = w_next.new_zeros((w_next.shape[0], extra, *w_next.shape[2:]))
        state[f"{p.next}.weight"] = torch.cat([w_next, zeros], 1)
    padded = create_model(name, **{**model.arch["kwargs"], **_widths_kwargs(name, model, kept)})
    padded.load_state_dict(state, strict=True)
    return padded.train(model.training)


RUNTIMES = ("torch", "onnxruntime")


@contextlib.contextmanager
def _threads(n):
    saved = torch.get_num_threads()
    torch.set_num_threads(n or saved)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def compare(model, *, row: str = "", cpu_reps: int = 50, gpu_reps: int = 50, gpu_batch: int = 512,
            rounds: int = 3, cpu_threads: int | None = None, gpu_bf16: bool = False,
            channels_last: bool = False, pad_to: int | None = None, runtime: str = "torch",
            ort_optimization: str = "all") -> dict:
    """Latencies (ms) of ``model`` and of the unpruned architecture, with FR and speedups. With
    ``runtime="onnxruntime"`` the CPU column times both models exported to ONNX Runtime (``serving``;
    each export checked against PyTorch first) at graph optimisation level ``ort_optimization``; the
    GPU column stays PyTorch."""
    if cpu_threads is not None and cpu_threads < 1:
        raise ValueError(f"cpu_threads must be >= 1 (None: torch's default), got {cpu_threads}")
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {RUNTIMES}, got {runtime!r}")
    if runtime == "onnxruntime" and channels_last:
        raise ValueError("channels_last is a PyTorch layout; ONNX Runtime chooses its own (NCHWc): drop one")
    if ort_optimization not in serving.OPTIMIZATIONS:
        raise ValueError(f"ort_optimization must be one of {tuple(serving.OPTIMIZATIONS)}, got {ort_optimization!r}")
    if ort_optimization != "all" and runtime != "onnxruntime":
        raise ValueError("ort_optimization sets ONNX Runtime's graph optimisation level: it needs runtime='onnxruntime'")
    dense = create_model(model.arch["name"]).eval()
    model = model.eval()
    shape = input_shape(model)
    fr = reduction(model)[0]
    out = {"row": row, "arch": model.arch["name"], "FR": fr}
    if pad_to:
        model = pad_widths(model, pad_to).eval()
        out["FR padded"] = reduction(model)[0]
    targets = [("cpu", 1, cpu_reps)] + ([("cuda", gpu_batch, gpu_reps)] if torch.cuda.is_available() else [])
    for device, batch, reps in targets:
        cuda = device == "cuda"
        if cuda:
            torch.backends.cudnn.benchmark = True
        opts = dict(batch=batch, device=device, reps=reps, bf16=cuda and gpu_bf16, channels_last=channels_last)
        ort = runtime == "onnxruntime" and not cuda
        if ort:
            sessions = [serving.session(serving.export_checked(m)[0], cpu_threads, ort_optimization)
                        for m in (dense, model)]
            def timed(i):
                return serving.latency_ms(sessions[i], shape, batch=batch, reps=reps)
        else:
            def timed(i):
                return latency_ms((dense, model)[i], shape, **opts)
        d, p = [], []
        with _threads(None if cuda else cpu_threads):
            for _ in range(rounds):
                d.append(timed(0))
                p.append(timed(1))
        key = (f"{device.upper()} bs{batch}" + (" ort" if ort else "")
               + (f" {ort_optimization}" if ort and ort_optimization != "all" else "")
               + (f" {cpu_threads}t" if cpu_threads and not cuda else "")
               + (" bf16" if cuda and gpu_bf16 else "") + (" cl" if channels_last else "")
               + (f" pad{pad_to}" if pad_to else ""))
        out[f"{key} dense ms"], out[f"{key} pruned ms"] = min(d), min(p)
        out[f"{key} speedup"] = min(d) / min(p)
        out[f"{key} speedup/FR"] = out[f"{key} speedup"] / fr
        dense.cpu(), model.cpu()
    return out


def summary(result: dict) -> str:
    """``compare``'s result as one line per timed column, e.g. ``CPU bs1 ort 1t: dense 0.056 ms,
    pruned 0.009 ms, speedup 5.95x (0.93 x FR 6.41x)``."""
    columns = [k[:-len(" speedup")] for k in result if k.endswith(" speedup")]
    return "\n".join(f"{c}: dense {result[c + ' dense ms']:.3f} ms, pruned {result[c + ' pruned ms']:.3f} ms, "
                     f"speedup {result[c + ' speedup']:.2f}x ({result[c + ' speedup/FR']:.2f} x FR {result['FR']:.2f}x)"
                     for c in columns)


def to_markdown(df: pd.DataFrame) -> str:
    """A GitHub table without the optional ``tabulate`` dependency."""
    def cell(v):
        return f"{v:.3f}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(df.columns) + " |", "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines)
