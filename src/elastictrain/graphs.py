"""CUDA graphs for a training forward whose architecture changes from epoch to epoch (CUP-SS).

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
    same parameters: a pruned model needs a new ``GraphedForward`` (``train._Compiled`` makes one).
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
