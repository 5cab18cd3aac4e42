"""Sharpness-aware minimisation (``elastictrain.sam``, ``TrainConfig.sam_rho``)."""
import collections
import dataclasses

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from elastictrain import sam
from elastictrain.models import create_model
from elastictrain.train import Callback, TrainConfig, fit


def _mlp(seed=0):
    torch.manual_seed(seed)
    return create_model("mlp", hidden=(16, 8))


def _batch(n=32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g)


def _grads(model, x, y):
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def _sam_shift(g, w, rho):
    """SAM's perturbation written out: rho·g/‖g‖ with g zeroed where the weight is zero."""
    masked = {n: g[n] * (w[n] != 0) for n in g}
    norm = torch.sqrt(sum((v ** 2).sum() for v in masked.values()))
    return {n: rho * v / norm for n, v in masked.items()}


def test_perturbation_has_radius_rho_skips_zero_weights_and_is_undone_exactly():
    model = _mlp()
    with torch.no_grad():
        model.fc1.weight[:3] = 0.0  # three pruned rows
    x, y = _batch()
    g = _grads(model, x, y)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with sam.perturbed(model, 0.05):
        moved = {n: p.detach() - before[n] for n, p in model.named_parameters()}
        assert torch.count_nonzero(model.fc1.weight[:3]) == 0
        shift = _sam_shift(g, before, 0.05)
        for n in moved:
            torch.testing.assert_close(moved[n], shift[n], rtol=1e-4, atol=1e-7)
        total = torch.sqrt(sum((v ** 2).sum() for v in moved.values()))
        assert float(total) == pytest.approx(0.05, rel=1e-4)
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), before[n])


def test_batchnorm_statistics_of_the_second_forward_are_discarded():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(10))
    x, y = torch.randn(8, 3, 6, 6), torch.randint(0, 10, (8,))
    F.cross_entropy(model(x), y).backward()
    bn = model[1]
    stats = bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone()
    with sam.perturbed(model, 0.1):
        F.cross_entropy(model(x), y).backward()
        assert not torch.equal(bn.running_mean, stats[0])  # the second forward did update them
    assert torch.equal(bn.running_mean, stats[0]) and torch.equal(bn.running_var, stats[1])
    assert int(bn.num_batches_tracked) == int(stats[2])


class _CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def test_perturbed_works_on_whole_lists_not_one_op_per_tensor():
    """On the GPU every op is a kernel launch per step: ResNet-56's 173 parameters and 171 BatchNorm
    buffers must not cost an op each (873 per step before session 55). Allocations launch nothing."""
    torch.manual_seed(0)
    model = create_model("resnet56").train()
    F.cross_entropy(model(torch.randn(2, 3, 32, 32)), torch.randint(0, 10, (2,))).backward()
    with _CountOps() as counted:
        with sam.perturbed(model, 0.05):
            pass
    assert counted.ops["empty_like"] == 173 + 171
    assert sum(counted.ops.values()) - counted.ops["empty_like"] == 15


def test_perturbed_refuses_bad_radius_and_missing_gradients():
    model = _mlp()
    with pytest.raises(ValueError, match="rho must be > 0"):
        with sam.perturbed(model, 0.0):
            pass
    with pytest.raises(ValueError, match="call backward"):
        with sam.perturbed(model, 0.05):
            pass
    with pytest.raises(ValueError, match="sam_rho must be >= 0"):
        TrainConfig(sam_rho=-0.1)


class _KeepPruned(Callback):
    def after_step(self, state):
        with torch.no_grad():
            state.model.fc1.weight[:3] = 0.0


def test_fit_takes_the_step_with_the_gradient_at_the_perturbed_weights():
    """One plain SGD step of ``fit`` equals SAM written out by hand, pruned rows included."""
    x, y = _batch()
    cfg = TrainConfig(epochs=1, lr=0.5, schedule="constant", momentum=0.0, nesterov=False, weight_decay=0.0,
                      sam_rho=0.05, compile=None)
    model = _mlp()
    with torch.no_grad():
        model.fc1.weight[:3] = 0.0
    ref = _mlp()
    ref.load_state_dict(model.state_dict())
    with torch.no_grad():
        loss0 = float(F.cross_entropy(ref(x), y))

    trained, hist = fit(model, [(x, y)], None, cfg, callbacks=[_KeepPruned()], device="cpu", progress=False)

    g = _grads(ref, x, y)
    w = {n: p.detach().clone() for n, p in ref.named_parameters()}
    shift = _sam_shift(g, w, 0.05)
    with torch.no_grad():
        for n, p in ref.named_parameters():
            p.add_(shift[n])
    g2 = _grads(ref, x, y)
    for n, p in trained.named_parameters():
        expected = w[n] - 0.5 * g2[n]
        if n == "fc1.weight":
            expected[:3] = 0.0
        torch.testing.assert_close(p.detach(), expected, rtol=1e-5, atol=1e-6)
    # and it is not the plain step
    plain = _mlp()
    plain.load_state_dict(w, strict=False)
    plain, _ = fit(plain, [(x, y)], None, dataclasses.replace(cfg, sam_rho=0.0), callbacks=[_KeepPruned()],
                   device="cpu", progress=False)
    assert (plain.fc2.weight - trained.fc2.weight).abs().max() > 1e-4
    # the recorded loss is the one at the unperturbed weights
    assert hist["train_loss"].iloc[0] == pytest.approx(loss0, rel=1e-5)


def test_sam_with_adversarial_training_reuses_the_attack_and_keeps_pruned_weights_at_zero():
    """With DNR's hybrid loss (beta 0.5) the second pass runs on the same [clean; PGD] batch: the step differs
    from the one without SAM (same weights, same attack seed), and pruned weights stay zero."""
    x, y = _batch(16)
    common = dict(epochs=1, lr=0.5, schedule="constant", momentum=0.0, nesterov=False, weight_decay=0.0,
                  adversarial_beta=0.5, adv_steps=2, adv_step_size=0.01, compile=None)
    runs = {}
    for rho in (0.0, 0.05):
        model = _mlp()
        with torch.no_grad():
            model.fc1.weight[:3] = 0.0
        runs[rho], hist = fit(model, [(x, y)], None, TrainConfig(sam_rho=rho, **common), callbacks=[_KeepPruned()],
                              device="cpu", progress=False)
        assert torch.count_nonzero(runs[rho].fc1.weight[:3]) == 0
        assert hist["train_loss"].notna().all()
    assert (runs[0.0].fc2.weight - runs[0.05].fc2.weight).abs().max() > 1e-4
