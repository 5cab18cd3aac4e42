"""L∞ attacks on [0, 1] inputs (spec elastictrain.md §2.7, §5.9): FGSM and PGD with a random start.

Our models hold their normalisation as their first layer (``models.Normalize``), so an attack
perturbs the raw image and the box [0, 1] is the image's own range, as in DNR and Ye et al.
The model runs in eval mode while the perturbation is computed (ElasticTrain's ModelEval does so,
and it keeps BatchNorm statistics from drifting towards adversarial batches during training);
the caller's train/eval mode is restored afterwards. Under CUDA the forward runs in bf16: the sign of
the gradient is all a step uses, and training-time PGD costs 7 forward/backward passes per batch.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F


def _autocast(x):
    return torch.autocast("cuda", dtype=torch.bfloat16) if x.is_cuda else torch.autocast("cpu", enabled=False)


def _input_grad(model, x, y):
    x = x.detach().requires_grad_(True)
    with _autocast(x):
        loss = F.cross_entropy(model(x).float(), y)
    return torch.autograd.grad(loss, x)[0]


def _eval_mode(model):
    was = model.training
    model.eval()
    return was


def fgsm(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float = 8 / 255) -> torch.Tensor:
    """One signed-gradient step of size ``eps`` from the clean image, clipped to [0, 1]."""
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    was = _eval_mode(model)
    with torch.enable_grad():
        g = _input_grad(model, x, y)
    model.train(was)
    return (x + eps * g.sign()).clamp(0, 1).detach()


def pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float = 8 / 255, step_size: float = 0.01,
        steps: int = 7, random_start: bool = True, generator: torch.Generator | None = None) -> torch.Tensor:
    """PGD-``steps``: uniform start in [−eps, eps], signed steps of ``step_size``, each projected onto
    [x − eps, x + eps] ∩ [0, 1]."""
    if eps < 0 or step_size <= 0 or steps < 1:
        raise ValueError(f"need eps >= 0, step_size > 0 and steps >= 1 (got {eps}, {step_size}, {steps})")
    was = _eval_mode(model)
    x = x.detach()
    if random_start:
        noise = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype) if generator is not None \
            else torch.rand_like(x)
        x_adv = (x + (2 * noise - 1) * eps).clamp(0, 1)
    else:
        x_adv = x.clone()
    with torch.enable_grad():
        for _ in range(steps):
            g = _input_grad(model, x_adv, y)
            x_adv = torch.min(torch.max(x_adv + step_size * g.sign(), x - eps), x + eps).clamp(0, 1).detach()
    model.train(was)
    return x_adv
