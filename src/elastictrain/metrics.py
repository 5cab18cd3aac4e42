"""Counting what a compressed model holds, the way ElasticTrain's ModelEval counts it.

ModelEval's compression = (conv + linear ``.weight`` elements) / (non-zero elements), times
32/bits when quantized; biases and BatchNorm are not counted, nor are indices or codebooks
(spec elastictrain.md §2.4). The honest counterpart, bytes of the exported file, is in ``storage``.
"""
import time

import pandas as pd
import torch
import torch.nn as nn

from .models.common import prunable_weights
from .precision import autocast


def layer_table(model: nn.Module) -> pd.DataFrame:
    """One row per conv/linear weight: shape, weights, non-zeros, density, unique non-zero values
    and (conv only) the fraction of all-zero k×k kernels."""
    rows = []
    for name, w in prunable_weights(model).items():
        w = w.detach()
        nz = w[w != 0]
        row = {"layer": name, "shape": "x".join(map(str, w.shape)), "weights": w.numel(),
               "nonzeros": int(nz.numel()), "density": nz.numel() / w.numel(),
               "unique_nonzero": int(torch.unique(nz).numel())}
        row["zero_kernels"] = (float((w.flatten(2) == 0).all(2).float().mean()) if w.ndim == 4
                               else float("nan"))
        rows.append(row)
    return pd.DataFrame(rows)


def kernel_supports(model: nn.Module) -> pd.DataFrame:
    """Surviving 3×3 kernels per layer and support: one column per distinct support (a 9-bit code,
    bit i = position i of the kernel in raster order). A pattern row keeps exactly its library's
    supports, so the column count is at most the library size."""
    counts = {}
    for name, w in prunable_weights(model).items():
        if w.dim() != 4 or w.shape[2:] != (3, 3):
            continue
        nz = w.detach().flatten(0, 1).flatten(1).ne(0)
        codes = (nz.long() << torch.arange(9, device=nz.device)).sum(1)
        code, n = codes[nz.any(1)].unique(return_counts=True)
        counts[name] = dict(zip(code.tolist(), n.tolist()))
    table = pd.DataFrame.from_dict(counts, orient="index").fillna(0).astype(int)
    return table[sorted(table.columns, key=lambda c: -table[c].sum())]


def block_nonzeros(model: nn.Module, structure) -> dict[str, torch.Tensor]:
    """Non-zeros in each block of ``structure`` (e.g. WORKLOAD's 16×4 grid), per conv/linear
    weight: the ModelEval workload printout. A balanced row has one value per layer."""
    from .prune.structure import as_4d_shape, blocks
    out = {}
    for name, w in prunable_weights(model).items():
        w4 = w.detach() if w.dim() == 4 else w.detach().reshape(as_4d_shape(w.shape))
        out[name] = blocks(w4.ne(0).float(), structure).sum(1).long()
    return out


def count_weights(model: nn.Module) -> tuple[int, int]:
    """(conv+linear weight count, non-zeros among them)."""
    ws = prunable_weights(model).values()
    return sum(w.numel() for w in ws), sum(int((w != 0).sum()) for w in ws)


def paper_compression(model: nn.Module, bits: int = 32) -> float:
    """ModelEval's ratio: weight count / non-zeros × 32 / bits (indices and codebooks ignored)."""
    total, nonzero = count_weights(model)
    if nonzero == 0:
        raise ValueError("the model has no non-zero conv/linear weight")
    return total / nonzero * 32 / bits


def dense_fp32_bytes(model: nn.Module) -> int:
    """Bytes of the counted weights stored densely in fp32 (58,862,336 for VGG16): the reference
    of the honest ratio."""
    return 4 * count_weights(model)[0]


def median_ms(call, reps: int = 50, warmup: int = 5) -> float:
    """Median wall time of ``call()`` in ms on the CPU clock, after ``warmup`` untimed calls: the
    median, not the mean, so that a stray scheduler pause does not move the figure."""
    for _ in range(warmup):
        call()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        call()
        times.append(1000 * (time.perf_counter() - t0))
    return float(sorted(times)[len(times) // 2])


def latency_ms(model: nn.Module, input_shape, *, batch: int = 1, device="cpu", reps: int = 50,
               bf16: bool = False, channels_last: bool = False) -> float:
    """Median wall time of one forward pass (CUDA: timed with events after a warm-up), in float32 or
    under bf16 autocast (CUDA only, as the trainer runs), in contiguous or channels_last layout. The
    layout is applied to ``model`` itself (harmless: only strides change). Under inference mode, as a
    server runs."""
    device = torch.device(device)
    if bf16 and device.type != "cuda":
        raise ValueError("bf16 latency is measured on CUDA only (the CPU path stays float32)")
    model = model.to(device).eval()
    x = torch.rand(batch, *input_shape, device=device)
    if channels_last and x.dim() == 4:
        model, x = model.to(memory_format=torch.channels_last), x.to(memory_format=torch.channels_last)
    with torch.inference_mode(), autocast(device, bf16):
        if device.type != "cuda":
            return median_ms(lambda: model(x), reps)
        for _ in range(5):
            model(x)
        times = []
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            model(x)
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
    return float(sorted(times)[len(times) // 2])
