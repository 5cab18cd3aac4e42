"""L∞ attacks on [0, 1] inputs (spec elastictrain.md §2.7, §5.9): FGSM and PGD with a random start.

Our models hold their normalisation as their first layer (``models.Normalize``), so an attack
perturbs the raw image and the box [0, 1] is the image's own range, as in DNR and Ye et al.
The model runs in eval mode while the perturbation is computed (ElasticTrain's ModelEval does so,
and it keeps BatchNorm statistics from drifting towards adversarial batches during training), with
its parameters frozen; the caller's mode and ``requires_grad`` flags are restored afterwards.
``pgd(bn="batch")`` is spec §5.9's optional alternative for training-time PGD: the model in train
mode, each BatchNorm normalising the attacked batch with its own statistics (as Madry et al.'s
training attacks do) while its running statistics stay untouched. Under
CUDA the forward runs in bf16: the sign of the gradient is all a step uses, and training-time PGD
costs 7 forward/backward passes per batch.

``forward``: the callable a PGD step differentiates, by default the model itself. ``fit`` passes a
compiled copy of the model (``TrainConfig.compile``), since eager VGG16 is bound by kernel launches.
Freezing the parameters matters there: eager autograd computes only the input's gradient anyway, but
a compiled graph's backward computes every gradient its inputs require.
"""
import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F

from .precision import autocast


def _input_grad(forward, x, y):
    x = x.detach().requires_grad_(True)
    with autocast(x.device):
        loss = F.cross_entropy(forward(x).float(), y)
    return torch.autograd.grad(loss, x)[0]


class _BatchStatisticsOnly:
    """A train-mode BatchNorm that normalises with the batch's own statistics and never writes its
    running ones (nor its step counter)."""

    def forward(self, x):
        return F.batch_norm(x, None, None, self.weight, self.bias, True, 0.0, self.eps)


class _BatchOnlyBatchNorm1d(_BatchStatisticsOnly, nn.BatchNorm1d):
    pass


class _BatchOnlyBatchNorm2d(_BatchStatisticsOnly, nn.BatchNorm2d):
    pass


ATTACK_BN = ("eval", "batch")


@contextlib.contextmanager
def _attacking(model, bn: str = "eval"):
    """Frozen weights, and BatchNorm as ``bn`` says: "eval" (running statistics) or "batch" (the
    attacked batch's own, leaving the running ones alone; the model in train mode)."""
    if bn not in ATTACK_BN:
        raise ValueError(f"bn must be one of {ATTACK_BN}, got {bn!r}")
    was, trainable = model.training, [p for p in model.parameters() if p.requires_grad]
    # Only the class changes (as in ``use_clean_statistics``), so the same parameters and buffers serve.
    swapped = [(m, type(m)) for m in model.modules() if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d))] \
        if bn == "batch" else []
    for m, _ in swapped:
        m.__class__ = _BatchOnlyBatchNorm2d if isinstance(m, nn.BatchNorm2d) else _BatchOnlyBatchNorm1d
    model.train(bn == "batch")
    for p in trainable:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in trainable:
            p.requires_grad_(True)
        for m, cls in swapped:
            m.__class__ = cls
        model.train(was)


def fgsm(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float = 8 / 255) -> torch.Tensor:
    """One signed-gradient step of size ``eps`` from the clean image, clipped to [0, 1]."""
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    with _attacking(model), torch.enable_grad():
        g = _input_grad(model, x, y)
    return (x + eps * g.sign()).clamp(0, 1).detach()


def pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float = 8 / 255, step_size: float = 0.01,
        steps: int = 7, random_start: bool = True, generator: torch.Generator | None = None,
        forward=None, bn: str = "eval") -> torch.Tensor:
    """PGD-``steps``: uniform start in [−eps, eps], signed steps of ``step_size``, each projected onto
    [x − eps, x + eps] ∩ [0, 1]. ``bn``: the BatchNorm statistics the attack sees ("eval" or "batch",
    see the module docstring)."""
    if eps < 0 or step_size <= 0 or steps < 1:
        raise ValueError(f"need eps >= 0, step_size > 0 and steps >= 1 (got {eps}, {step_size}, {steps})")
    graphed = forward is not None and forward is not model
    forward = model if forward is None else forward
    x = x.detach()
    if random_start:
        noise = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype) if generator is not None \
            else torch.rand_like(x)
        x_adv = (x + (2 * noise - 1) * eps).clamp(0, 1)
    else:
        x_adv = x.clone()
    with _attacking(model, bn), torch.enable_grad():
        for _ in range(steps):
            if graphed:  # CUDA graphs ("reduce-overhead") may reuse the last step's output buffers now
                torch.compiler.cudagraph_mark_step_begin()
            g = _input_grad(forward, x_adv, y)
            x_adv = torch.min(torch.max(x_adv + step_size * g.sign(), x - eps), x + eps).clamp(0, 1).detach()
    return x_adv


# Hybrid adversarial training normalises one concatenated batch [clean; adversarial], so BatchNorm's
# batch and running statistics describe a mixture of the two, while a test image is clean. With
# ``TrainConfig.adv_bn_stats = "clean"`` the whole batch is normalised with the clean half's
# statistics and only those enter the running averages: training and test then normalise alike, and
# an adversarial image is normalised at test time exactly as it was in training. (Two forwards, one
# per half, would also give the clean half its own statistics, but the adversarial half would be
# trained under statistics the test-time model never uses: that cost 6 points clean, see
# benchmarks/results/robust_variants.md.) Our extension; DNR publishes no training code. Measured on
# notebook 16's R1 (session 16): 85.80% clean against 85.62% mixed, within the run-to-run spread.
class _CleanHalfStatistics:
    """Train-mode forward of a BatchNorm whose batch is [clean; adversarial] in equal halves."""

    def forward(self, x):
        if not self.training:
            return super().forward(x)
        dims = [0] + list(range(2, x.dim()))
        clean = x[: len(x) // 2].float()
        var, mean = torch.var_mean(clean, dims, unbiased=False)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = self.momentum if self.momentum is not None else 1 / float(self.num_batches_tracked)
                count = clean.numel() // clean.shape[1]
                self.running_mean.lerp_(mean, momentum)
                self.running_var.lerp_(var * count / max(count - 1, 1), momentum)
        shape = [1, -1] + [1] * (x.dim() - 2)
        scale = torch.rsqrt(var + self.eps)
        shift = -mean * scale
        if self.affine:
            scale, shift = scale * self.weight, shift * self.weight + self.bias
        return (x.float() * scale.view(shape) + shift.view(shape)).to(x.dtype)


class _CleanStatsBatchNorm1d(_CleanHalfStatistics, nn.BatchNorm1d):
    pass


class _CleanStatsBatchNorm2d(_CleanHalfStatistics, nn.BatchNorm2d):
    pass


_CLEAN_STATS = {nn.BatchNorm1d: _CleanStatsBatchNorm1d, nn.BatchNorm2d: _CleanStatsBatchNorm2d}


def use_clean_statistics(model: nn.Module, on: bool = True) -> nn.Module:
    """Switch ``model``'s BatchNorm layers to (``on``) or back from the clean-half statistics above.

    Only the class changes: parameters, buffers and the state dict are the same objects, so a
    checkpoint written meanwhile loads into a plain model. Idempotent; returns ``model``."""
    swap = _CLEAN_STATS if on else {v: k for k, v in _CLEAN_STATS.items()}
    for m in model.modules():
        if type(m) in swap:
            m.__class__ = swap[type(m)]
    return model
