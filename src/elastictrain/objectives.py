"""The training loss of one batch, for ``train.fit``: cross-entropy, with the options a
``TrainConfig`` turns on — DNR's hybrid clean/adversarial loss, distillation from a teacher in the
clean term, and mixup of the batch (the teacher then labels the same mixed images)."""
import numpy as np
import torch
import torch.nn.functional as F


def mixup(x: torch.Tensor, alpha: float, rng: np.random.Generator) -> tuple[torch.Tensor, tuple]:
    """``x`` mixed with a permutation of itself (``TrainConfig.mixup``), and ``(perm, lam)`` for the loss.
    Drawn on the host: no device synchronisation per step."""
    lam = float(rng.beta(alpha, alpha))
    perm = torch.from_numpy(rng.permutation(len(x))).to(x.device, non_blocking=True)
    return lam * x + (1 - lam) * x[perm], (perm, lam)


def objective(out, out_adv, y, x, teacher, config, mix=None) -> torch.Tensor:
    """One batch's training loss: cross-entropy on ``out`` (the logits of ``x``), or with adversarial
    logits DNR's hybrid beta·clean + (1 − beta)·CE(``out_adv``). A teacher's distillation replaces part of
    the clean term only: the teacher is not robust, so its view of an adversarial image is no target,
    and the adversarial term keeps its weight 1 − beta. ``mix = (perm, lam)``: ``x`` is a mixup of the
    batch, and the cross-entropy is lam·CE(y) + (1 − lam)·CE(y[perm])."""
    clean = F.cross_entropy(out, y, label_smoothing=config.label_smoothing)
    if mix is not None:
        perm, lam = mix
        clean = lam * clean + (1 - lam) * F.cross_entropy(out, y[perm], label_smoothing=config.label_smoothing)
    if teacher is not None:
        clean = _distill(clean, out, teacher, x, config)
    if out_adv is None:
        return clean
    return (config.adversarial_beta * clean
            + (1 - config.adversarial_beta) * F.cross_entropy(out_adv, y, label_smoothing=config.label_smoothing))


def _distill(ce, out, teacher, x, config):
    with torch.no_grad():
        target = F.log_softmax(teacher(x).float() / config.distill_temperature, dim=1)
    student = F.log_softmax(out.float() / config.distill_temperature, dim=1)
    kl = F.kl_div(student, target, log_target=True, reduction="batchmean")
    a = config.distill_alpha
    return (1 - a) * ce + a * config.distill_temperature ** 2 * kl
