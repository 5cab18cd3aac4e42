"""Serving a shipped model outside PyTorch: export to ONNX, run it in ONNX Runtime on the CPU.

Why: at batch 1 a PyTorch forward on the CPU pays dispatch and allocation for every op, and
pruning does not shrink that cost. ONNX Runtime runs the exported graph with Conv + BatchNorm +
ReLU fused and far less per-node overhead. On the 2-core CPU machine (CI's kind, session 29,
benchmarks/latency.py on both threads) the dense ResNet-56 takes 1.1 ms there against 4.6 ms in
PyTorch, and CUP's pruned MLP 0.010 ms against 0.039 ms.

The ``.etm`` file stays the compact storage format (indices, packed codes, codebooks). An ONNX
file holds dense float32 tensors, zeros included, so it is as large as the layer widths make
it: the right thing for CUP's physically smaller models, and no smaller than dense for the
unstructured ElasticTrain rows, whose zeros ONNX Runtime multiplies like any other weight.

onnx, onnxscript (torch's exporter needs both) and onnxruntime are pinned in requirements.txt but
are not dependencies of the package: the GPU machine lacks them, so they are imported only when a
function here runs, and a missing one is named with the command that installs it.
"""
import copy
import importlib
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from .checkpoints import atomic_write
from .metrics import median_ms
from .models import input_shape

INPUT, OUTPUT = "input", "logits"
# Largest |ONNX Runtime - PyTorch| accepted by export_checked, relative to the largest |logit| (or 1
# when that is smaller): float32 kernels that sum in another order differ by ~1e-7 of it (every CUP
# file; an untrained ResNet-56 whose logits reach 1e4), while a wrong graph is off by whole units.
TOLERANCE = 1e-4


def _require(module: str):
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(f"{module} is needed to serve a model through ONNX Runtime; install the pinned "
                          "versions with: pip install -r requirements.txt") from err


def to_onnx(model: nn.Module, path=None) -> bytes:
    """The ONNX graph of ``model`` in eval mode on the CPU (batch dimension dynamic, input named
    ``input`` in [0, 1] as the model takes it, output ``logits``); written atomically to ``path``
    when given. ``model`` itself is not moved or switched to eval."""
    for module in ("onnx", "onnxscript"):
        _require(module)
    model = copy.deepcopy(model).cpu().eval()
    example = torch.zeros(2, *input_shape(model))     # 2, not 1: torch.export specialises a size-1 dim
    program = torch.onnx.export(model, (example,), dynamo=True, verbose=False, input_names=[INPUT],
                                output_names=[OUTPUT], dynamic_shapes=({0: torch.export.Dim("batch")},))
    data = program.model_proto.SerializeToString()
    if path is not None:
        atomic_write(Path(path), lambda f: f.write(data))
    return data


# ONNX Runtime's graph optimisation levels, by the names its GraphOptimizationLevel gives them.
# "all" adds the blocked NCHWc layout (channels in blocks of 16 with AVX-512, 8 with AVX2) to
# "extended"'s fusions. It is the faster level for every ResNet-56, dense or pruned, and for every
# VGG16 on two threads, but a pruned width is paid for as whole blocks: a ResNet-56 block that keeps
# 7 of 16 filters costs what 16 do. "extended" keeps plain NCHW, where time follows the width (on
# one thread the CUP-SS VGG16 files, whose widths are arbitrary, run faster there), so the pair of
# levels separates what pruning saves from what the layout rounds away (session 31 on the 2-core
# CPU, benchmarks/results/cup_latency.md).
OPTIMIZATIONS = {"basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED", "all": "ORT_ENABLE_ALL"}


def session(onnx_model: bytes, threads: int | None = None, optimization: str = "all"):
    """An ONNX Runtime CPU session with graph optimisations up to ``optimization`` (one of
    ``OPTIMIZATIONS``; "all" includes the blocked NCHWc layout) and ``threads`` intra-op threads
    (default: as many as torch uses)."""
    if optimization not in OPTIMIZATIONS:
        raise ValueError(f"optimization must be one of {tuple(OPTIMIZATIONS)}, got {optimization!r}")
    ort = _require("onnxruntime")
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be >= 1 (None: torch's default), got {threads}")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or torch.get_num_threads()
    opts.inter_op_num_threads = 1            # one graph, one request: parallelism inside ops only
    opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, OPTIMIZATIONS[optimization])
    return ort.InferenceSession(onnx_model, opts, providers=["CPUExecutionProvider"])


def run(sess, x: torch.Tensor) -> torch.Tensor:
    """Logits of a batch ``x`` (float32 in [0, 1]) through ``sess``."""
    out = sess.run([OUTPUT], {INPUT: x.detach().cpu().float().numpy()})[0]
    return torch.from_numpy(out)


def max_difference(model: nn.Module, sess, batch: int = 4, seed: int = 0) -> float:
    """Largest |ONNX Runtime - PyTorch| logit on a random batch in [0, 1], relative to the largest
    |logit| (or to 1 when that is smaller)."""
    x = torch.rand(batch, *input_shape(model), generator=torch.Generator().manual_seed(seed))
    with torch.inference_mode():
        ref = copy.deepcopy(model).cpu().eval()(x)
    return float((run(sess, x) - ref).abs().max() / ref.abs().max().clamp_min(1.0))


def export_checked(model: nn.Module, path=None) -> tuple[bytes, float]:
    """``to_onnx`` followed by a check that ONNX Runtime reproduces PyTorch's logits within
    ``TOLERANCE``; returns the graph and the largest relative difference, and writes ``path`` only
    when the check passes."""
    data = to_onnx(model)
    diff = max_difference(model, session(data))
    if not diff <= TOLERANCE:
        raise ValueError(f"ONNX Runtime's logits differ from PyTorch's by {diff:.3g} of the largest (> {TOLERANCE}): "
                         "the export is wrong; nothing was written")
    if path is not None:
        atomic_write(Path(path), lambda f: f.write(data))
    return data, diff


def latency_ms(sess, shape, *, batch: int = 1, reps: int = 50) -> float:
    """Median wall time of one ``sess`` run on a random batch, as ``metrics.latency_ms`` times
    PyTorch on the CPU."""
    feed = {INPUT: np.random.default_rng(0).random((batch, *shape), dtype=np.float32)}
    return median_ms(lambda: sess.run([OUTPUT], feed), reps)
