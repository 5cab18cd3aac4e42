"""How ``fit`` runs its training forward: compiled, as a CUDA graph per epoch, or eager (``TrainingForward``).

The CUDA graphs here serve a training forward whose architecture changes from epoch to epoch (CUP-SS).
Small CIFAR nets are bound by kernel launches, so ``fit`` runs its training forward under
``torch.compile(mode="reduce-overhead")`` (CUDA graphs). That compiles once per set of shapes, tens
of seconds for ResNet-56, and CUP-SS builds a new architecture before every pruning epoch, so those
epochs used to run eager: 7.3 s each for ResNet-56 at batch 256 against 1.65 s compiled (H100, session
13), and at the paper's batch 64 (four times the steps) 19 s on an idle H100, which kept that recipe off
one machine.

``torch.cuda.make_graphed_callables`` captures one forward and one backward directly, with no
compiler, so each pruning epoch can afford its own capture: with it, that batch-64 epoch takes 4.2 s,
capture included (``benchmarks/train_throughput.py --synthetic --deferred``, training only). Notebook 15
at batch 64, which also augments, evaluates and runs a CUP pass every epoch, then trained in 1,083 s
(6.3 s per epoch, idle nvidia-h100-x1, session 20): one machine. The graph replays the eager
step's kernels on the same parameters and BatchNorm buffers (the warm-up passes' updates of the running
statistics are undone) and the optimiser stays eager; a CUDA test compares graphed and eager steps.
"""
import torch
from torch import nn

from . import distributed
from .precision import autocast


class _Forward(nn.Module):
    """make_graphed_callables replaces the ``forward`` of the module it is given; capturing this
    wrapper leaves the model's own ``forward`` (evaluation, saving, the next CUP pass) untouched."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x)


class GraphedForward:
    """The training forward of ``model`` as a CUDA graph, captured at the first call.

    Replays need the captured batch's shape, dtype and strides; any other batch (a last partial one)
    runs the model eagerly. The model must be in training mode and stay the same object with the
    same parameters: a pruned model needs a new ``GraphedForward`` (``TrainingForward`` makes one).
    """

    def __init__(self, model: nn.Module, amp: bool):
        self.model, self.amp = model, amp
        self.fn, self.key = None, None

    def __call__(self, x: torch.Tensor):
        key = (x.shape, x.dtype, x.stride())
        if self.fn is None:
            self._capture(x)
            self.key = key
        if key != self.key:
            return self.model(x)
        return self.fn(x)

    def _capture(self, x):
        if not self.model.training:
            raise ValueError("GraphedForward captures the training forward: put the model in train mode first")
        saved = [b.detach().clone() for b in self.model.buffers()]
        # The replays run in the capture's precision whatever context they are called from.
        with autocast(x.device, self.amp, cache=False):
            self.fn = torch.cuda.make_graphed_callables(_Forward(self.model), (x.detach().clone(),))
        with torch.no_grad():  # the warm-up forwards moved BatchNorm's running statistics: undo that
            for b, s in zip(self.model.buffers(), saved):
                b.copy_(s)


class TrainingForward:
    """The training forward: the model, wrapped in DistributedDataParallel under torchrun and
    compiled when a mode is set; rebuilt when a callback swaps the model (CUP-SS).

    Small CIFAR nets are bound by kernel launches at any batch size (ResNet-56 on an H200: ~21 ms
    per step at batch 256 and at 512). Measured there: mode "default" gains nothing, while
    "reduce-overhead" (CUDA graphs) is 2.6x faster on ResNet-56 and 1.75x on VGG16. Evaluation stays eager.
    While compiling is deferred (``eager=True``: the shapes change every epoch), "reduce-overhead" with
    ``graph_when_deferred`` captures each model's forward as a CUDA graph without compiling it.
    """

    def __init__(self, mode, ddp=False, graph_when_deferred=False, amp=True):
        self.mode, self.ddp = mode, ddp
        self.graph = graph_when_deferred and mode == "reduce-overhead" and not ddp
        self.amp = amp
        self.source, self.wrapped, self.fn, self.graphed = None, None, None, None

    def __call__(self, model, eager=False):
        if eager and self.graph:
            if self.graphed is None or self.graphed.model is not model:
                self.graphed = GraphedForward(model, self.amp)
            return self.graphed
        self.graphed = None  # frees the last pruning epoch's graph once compiling takes over
        if not self.ddp and (self.mode is None or eager):
            return model
        if model is not self.source:
            self.source, self.fn = model, None
            self.wrapped = distributed.ddp(model) if self.ddp else model
        if self.mode is None or eager:
            return self.wrapped
        if self.fn is None:
            self.fn = torch.compile(self.wrapped, mode=self.mode)
        return self.fn
