"""The training loss of one batch, for ``train.fit``: cross-entropy, with the options a
``TrainConfig`` turns on — DNR's hybrid clean/adversarial loss, distillation from a teacher in the
clean term (with attention transfer between their activation maps), and mixup of the batch (the
teacher then labels the same mixed images)."""
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


def mixup(x: torch.Tensor, alpha: float, rng: np.random.Generator) -> tuple[torch.Tensor, tuple]:
    """``x`` mixed with a permutation of itself (``TrainConfig.mixup``), and ``(perm, lam)`` for the loss.
    Drawn on the host: no device synchronisation per step."""
    lam = float(rng.beta(alpha, alpha))
    perm = torch.from_numpy(rng.permutation(len(x))).to(x.device, non_blocking=True)
    return lam * x + (1 - lam) * x[perm], (perm, lam)


def objective(out, out_adv, y, x, teacher, config, mix=None, maps=None) -> torch.Tensor:
    """One batch's training loss: cross-entropy on ``out`` (the logits of ``x``), or with adversarial
    logits DNR's hybrid beta·clean + (1 − beta)·CE(``out_adv``). A teacher's distillation replaces part of
    the clean term only: the teacher is not robust, so its view of an adversarial image is no target,
    and the adversarial term keeps its weight 1 − beta. ``mix = (perm, lam)``: ``x`` is a mixup of the
    batch, and the cross-entropy is lam·CE(y) + (1 − lam)·CE(y[perm]). ``maps``: the student's
    activation maps (``WithMaps``), compared with the teacher's by attention transfer."""
    clean = F.cross_entropy(out, y, label_smoothing=config.label_smoothing)
    if mix is not None:
        perm, lam = mix
        clean = lam * clean + (1 - lam) * F.cross_entropy(out, y[perm], label_smoothing=config.label_smoothing)
    if teacher is not None:
        clean = _distill(clean, out, teacher, x, config, maps)
    if out_adv is None:
        return clean
    return (config.adversarial_beta * clean
            + (1 - config.adversarial_beta) * F.cross_entropy(out_adv, y, label_smoothing=config.label_smoothing))


def _distill(ce, out, teacher, x, config, maps=None):
    with torch.no_grad():
        if maps is None:
            t_out = teacher(x)
        else:
            t_out, t_maps = teacher.forward_with_maps(x)
        target = F.log_softmax(t_out.float() / config.distill_temperature, dim=1)
    student = F.log_softmax(out.float() / config.distill_temperature, dim=1)
    kl = F.kl_div(student, target, log_target=True, reduction="batchmean")
    a = config.distill_alpha
    loss = (1 - a) * ce + a * config.distill_temperature ** 2 * kl
    if maps is not None:
        loss = loss + config.attention_beta / 2 * attention_transfer(maps, t_maps)
    return loss


def needs_maps(model: nn.Module, role: str):
    """Refuse, before training starts, a student or teacher that cannot give its activation maps."""
    if not callable(getattr(model, "forward_with_maps", None)):
        raise ValueError(f"attention transfer needs the {role}'s activation maps, and {type(model).__name__} has no "
                         f"forward_with_maps (VGG16 has); set attention_beta = 0 for this model")


class WithMaps(nn.Module):
    """``model`` with ``forward`` giving ``(logits, maps)``, so the training forward, maps included,
    can be compiled like the plain one (``graphs.TrainingForward`` compiles a module's forward)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        needs_maps(model, "student")
        self.model = model

    def forward(self, x):
        return self.model.forward_with_maps(x)


def attention(f: torch.Tensor) -> torch.Tensor:
    """Each image's spatial attention: the channel mean of f², flattened, scaled to unit L2 norm."""
    return F.normalize(f.float().pow(2).mean(1).flatten(1), dim=1)


# The map sides attention transfer's beta was tuned on (Zagoruyko & Komodakis: WRN's groups at 32², 16²
# and 8²). Its loss is a mean over positions, so on VGG16's 4² and 2² pool inputs one map would weigh 4
# and 16 times an 8² one (at most beta/2 · 2/side² each: 62 and 250 against 16 at beta 1e3; the five-map
# loss of a random-init student and teacher was ~157 in an H100 check, session 38). They are left out.
MIN_SIDE = 8


def attention_transfer(student_maps, teacher_maps) -> torch.Tensor:
    """Attention transfer (Zagoruyko & Komodakis, ICLR 2017, as their code computes it): the sum over
    the maps of side >= ``MIN_SIDE`` of mean((a_s − a_t)²). Each attention has unit norm, so the two
    may differ in channels and activation scale, not in the number of maps or their spatial size."""
    if len(student_maps) != len(teacher_maps):
        raise ValueError(f"the student gives {len(student_maps)} maps and the teacher {len(teacher_maps)}")
    total = 0.0
    for s, t in zip(student_maps, teacher_maps):
        if s.shape[0] != t.shape[0] or s.shape[2:] != t.shape[2:]:
            raise ValueError(f"maps of shapes {tuple(s.shape)} and {tuple(t.shape)}: batch and spatial size must agree")
        if min(s.shape[2:]) >= MIN_SIDE:
            total = total + (attention(s) - attention(t)).pow(2).mean()
    return total
