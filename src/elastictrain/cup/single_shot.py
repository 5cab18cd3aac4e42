"""CUP-SS (CUP-RF in the BigData 2021 version): prune during the first training run (cup.md §1.11).

At the start of every epoch e (1-indexed) while pruning is on: t_e = k·(e − offset) + b, a full CUP
pass at t_e on the current weights, then a brand-new optimiser (momentum reset, even when nothing
changed: quirk Q11). Once the model is within budget (params or FLOPs, checked after each pass,
so the last step may overshoot: Q13), pruning stops for good and training simply continues.

Both budgets at once is our extension: the params budget alone leaves the FLOPs to the run (VGG16
k = 0.02 stopped anywhere between 2.81x and 3.32x over eight runs of one recipe, cup_variants.md),
so a FLOPs budget beside it keeps pruning until the model is at least as small as the paper's on
both counts.
"""
from ..flops import count_flops, count_params
from ..train import Callback, prepare_model
from .cluster import check_multiple
from .surgery import cup_prune


class CupSS(Callback):
    """``wd_after_stop``: our option, not the paper's. t is an absolute weight-norm distance, so the
    weight decay shapes when the budget is reached and must stay the paper's (1e-4) while pruning
    runs; once the architecture is final, t no longer matters and a stronger decay may generalise
    better. It is set on the optimiser built at the stopping epoch (resumes restore it with the
    optimiser's state).

    ``multiple`` (our extension, as in ``cup_prune``): every pass rounds each layer's cluster count up
    to a multiple of it (or the layer's current width) with a finer cut of the same dendrogram; 1 is
    CUP-SS itself."""

    def __init__(self, k: float, *, b: float = 0.0, offset: int = 1, max_params: int | None = None,
                 max_flops: int | None = None, use_bias: bool | None = None,
                 wd_after_stop: float | None = None, multiple: int = 1):
        if max_params is None and max_flops is None:
            raise ValueError("give a budget: max_params (VGG16 0.90M), max_flops (ResNet-56 0.12G), or both "
                             "(pruning then stops once both hold)")
        check_multiple(multiple)
        self.k, self.b, self.offset = k, b, offset
        self.max_params, self.max_flops, self.use_bias = max_params, max_flops, use_bias
        self.wd_after_stop, self.multiple = wd_after_stop, multiple
        self.active, self.stopped_at = True, None

    def within_budget(self, params: int, flops: int) -> bool:
        return ((self.max_params is None or params <= self.max_params)
                and (self.max_flops is None or flops <= self.max_flops))

    def t_at(self, epoch: int) -> float:
        return self.k * (epoch - self.offset) + self.b

    def before_epoch(self, state):
        e = state.epoch + 1
        if self.active:
            t = self.t_at(e)
            pruned, _ = cup_prune(state.model, t=t, use_bias=self.use_bias, multiple=self.multiple)
            state.model = prepare_model(pruned.train(), state.device)
            state.rebuild_optimizer()
            state.metrics["t"] = t
            params, flops = count_params(state.model), count_flops(state.model)
            if self.within_budget(params, flops):
                self.active, self.stopped_at = False, e
                if self.wd_after_stop is not None:
                    for g in state.optimizer.param_groups:
                        if g["weight_decay"] > 0:  # the no-decay group (BN, biases), if any, stays at 0
                            g["weight_decay"] = self.wd_after_stop
        # The shapes change at every pruning epoch: while this is set, fit captures each epoch's model
        # as a CUDA graph (graphs.GraphedForward) rather than compiling it, so torch.compile compiles
        # once, for the final architecture.
        state.defer_compile = self.active
        state.metrics["params"] = count_params(state.model)
        state.metrics["flops"] = count_flops(state.model)

    def state_dict(self):
        return {"active": self.active, "stopped_at": self.stopped_at}

    def load_state_dict(self, d):
        self.active, self.stopped_at = d["active"], d["stopped_at"]
