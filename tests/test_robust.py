"""Tests for adversarial robustness: FGSM and PGD (elastictrain.attacks, spec §2.7), DNR's hybrid loss
in ``fit`` (§5.9), and ``elastictrain.robust`` (evaluation, figures recorded in a shipped file,
the comparison with DNR). Attacks run on the CPU in float32; trained models are small MLPs on a
slice of MNIST ($ELASTICTRAIN_DATA), trained in about a second."""
import copy

import pandas as pd
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from elastictrain import attacks, robust
from elastictrain import data as D
from elastictrain.accuracy import evaluate
from elastictrain.data import DatasetMissingError, GpuLoader, Split
from elastictrain.metrics import count_weights
from elastictrain.models import create_model
from elastictrain.models.common import prunable_weights
from elastictrain.prune import MaskCallback, PruneSpec
from elastictrain.storage import load_compressed, read_header, save_compressed
from elastictrain.train import Callback, TrainConfig, fit

EPS = 8 / 255


@pytest.fixture(autouse=True)
def private_checkpoints_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("ELASTICTRAIN_CHECKPOINTS", str(tmp_path / "ckpts"))


def bn_net(seed=0):
    """A small conv net with BatchNorm and a Normalize-free [0, 1] input, as the attacks expect."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, 10))


def images(n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, 8, 8, generator=g)
    x[:, :, 0] = 0.0     # rows on the box's edges: the clip to [0, 1] must hold there too
    x[:, :, 1] = 1.0
    return x, torch.randint(0, 10, (n,), generator=g)


# ===================================================================================== attacks

@pytest.mark.parametrize("attack", [
    lambda m, x, y: attacks.fgsm(m, x, y, eps=EPS),
    lambda m, x, y: attacks.pgd(m, x, y, eps=EPS, steps=7),
    lambda m, x, y: attacks.pgd(m, x, y, eps=EPS, step_size=0.05, steps=3),   # steps larger than eps
], ids=["fgsm", "pgd7", "pgd3-big-step"])
def test_perturbation_stays_in_the_eps_ball_and_the_box(attack):
    model, (x, y) = bn_net().eval(), images()
    adv = attack(model, x, y)
    delta = adv - x
    assert delta.abs().max() <= EPS + 1e-6
    assert adv.min() >= 0 and adv.max() <= 1
    # the attack does move the image: most pixels off the box's edges sit on the ball's surface
    inside = (x[:, :, 2:] > EPS) & (x[:, :, 2:] < 1 - EPS)
    assert (delta[:, :, 2:][inside].abs() > EPS - 1e-6).float().mean() > 0.5


def test_fgsm_moves_every_free_pixel_by_exactly_eps():
    model, (x, y) = bn_net().eval(), images()
    delta = attacks.fgsm(model, x, y, eps=EPS) - x
    free = (x > EPS) & (x < 1 - EPS)
    assert torch.allclose(delta[free].abs(), torch.full_like(delta[free], EPS), atol=1e-6)
    assert (delta[x == 0] >= 0).all() and (delta[x == 1] <= 0).all()


def test_pgd_of_one_step_of_eps_without_random_start_is_fgsm():
    model, (x, y) = bn_net().eval(), images()
    pgd = attacks.pgd(model, x, y, eps=EPS, step_size=EPS, steps=1, random_start=False)
    assert torch.equal(pgd, attacks.fgsm(model, x, y, eps=EPS))


def test_pgd_random_start_follows_its_generator():
    model, (x, y) = bn_net().eval(), images()

    def run(seed):
        return attacks.pgd(model, x, y, steps=2, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(run(0), run(0))
    assert (run(0) != run(1)).float().mean() > 0.5


def test_eps_zero_leaves_the_image_unchanged():
    model, (x, y) = bn_net().eval(), images()
    assert torch.equal(attacks.fgsm(model, x, y, eps=0.0), x)
    assert torch.equal(attacks.pgd(model, x, y, eps=0.0, steps=3), x)


@pytest.mark.parametrize("training", [True, False])
def test_attacks_run_in_eval_mode_and_restore_the_mode(training):
    model, (x, y) = bn_net(), images()
    model.train(training)
    bn = model[1]
    stats = bn.running_mean.clone(), bn.running_var.clone(), int(bn.num_batches_tracked)
    attacks.pgd(model, x, y, steps=3)
    attacks.fgsm(model, x, y)
    assert model.training is training
    assert torch.equal(bn.running_mean, stats[0]) and torch.equal(bn.running_var, stats[1])
    assert int(bn.num_batches_tracked) == stats[2]            # no forward ran in train mode
    assert all(p.grad is None for p in model.parameters())   # only the input's gradient is taken


def test_attacks_freeze_the_weights_only_while_attacking():
    model, (x, y) = bn_net(), images()
    model[0].weight.requires_grad_(False)                    # a layer the caller froze stays frozen
    seen = []
    forward = lambda inp: (seen.append([p.requires_grad for p in model.parameters()]), model(inp))[1]
    attacks.pgd(model, x, y, steps=2, forward=forward)
    assert len(seen) == 2 and not any(any(flags) for flags in seen)
    assert [p.requires_grad for p in model.parameters()] == [False] + [True] * (len(seen[0]) - 1)


def skewed_bn_net():
    """bn_net with running statistics far from any batch's, so the two BatchNorm modes differ."""
    model = bn_net()
    with torch.no_grad():
        model[1].running_mean.fill_(0.7), model[1].running_var.fill_(4.0)
    return model


@pytest.mark.parametrize("training", [True, False])
def test_batch_statistics_attack_leaves_running_statistics_mode_and_classes_alone(training):
    model, (x, y) = skewed_bn_net(), images()
    model.train(training)
    before = copy.deepcopy(model.state_dict())
    attacks.pgd(model, x, y, steps=3, bn="batch")
    assert model.training is training and type(model[1]) is nn.BatchNorm2d
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)      # running stats and counter included
    assert all(p.grad is None and p.requires_grad for p in model.parameters())
    attacks.use_clean_statistics(model)                                # a swapped class comes back as it was
    attacks.pgd(model, x, y, steps=1, bn="batch")
    assert type(model[1]) is attacks._CleanStatsBatchNorm2d


def test_batch_statistics_attack_steps_along_the_train_mode_gradient():
    model, (x, y) = skewed_bn_net().eval(), images()
    step = attacks.pgd(model, x, y, eps=EPS, step_size=EPS, steps=1, random_start=False, bn="batch")
    reference = copy.deepcopy(model).train()                           # batch statistics (its own copy updates)
    xr = x.clone().requires_grad_(True)
    g = torch.autograd.grad(F.cross_entropy(reference(xr), y), xr)[0]
    assert torch.equal(step, (x + EPS * g.sign()).clamp(0, 1))
    eval_step = attacks.fgsm(model, x, y, eps=EPS)
    assert (step != eval_step).float().mean() > 0.05                   # not the running-statistics attack


@pytest.mark.parametrize("kw", [dict(eps=-0.1), dict(step_size=0.0), dict(steps=0)])
def test_pgd_rejects_bad_settings(kw):
    model, (x, y) = bn_net().eval(), images()
    with pytest.raises(ValueError, match="need eps"):
        attacks.pgd(model, x, y, **kw)


def test_attack_batchnorm_mode_is_checked():
    model, (x, y) = bn_net().eval(), images()
    with pytest.raises(ValueError, match="bn must be one of"):
        attacks.pgd(model, x, y, steps=1, bn="train")
    assert type(model[1]) is nn.BatchNorm2d and not model.training    # refused before anything changed
    with pytest.raises(ValueError, match="adv_attack_bn"):
        TrainConfig(adversarial_beta=0.5, adv_attack_bn="train")


@pytest.mark.parametrize("kw", [dict(adversarial_beta=-0.1), dict(adversarial_beta=1.01), dict(adv_steps=0),
                                dict(adv_eps=-1.0), dict(adv_step_size=0.0)])
def test_train_config_rejects_bad_adversarial_settings(kw):
    with pytest.raises(ValueError, match="adversarial_beta"):
        TrainConfig(**kw)
    TrainConfig(adversarial_beta=0.0), TrainConfig(adversarial_beta=1.0)   # both ends are valid


# ========================================================================== hybrid loss in fit

def tiny_split(n=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    return Split(torch.randint(0, 256, (n, 1, 28, 28), dtype=torch.uint8, generator=g),
                 torch.randint(0, 10, (n,), generator=g), "tiny-mnist")


def small_mlp(seed=0, hidden=(64, 32)):
    torch.manual_seed(seed)
    return create_model("mlp", hidden=hidden)


PGD = attacks.pgd   # the real one: the tests below patch the module's attribute, which fit calls


class PgdSpy:
    """Wraps attacks.pgd: counts the calls and keeps the first call's model state and images."""

    def __init__(self):
        self.calls, self.first = 0, None

    def __call__(self, model, x, y, **kw):
        adv = PGD(model, x, y, **kw)
        if self.first is None:
            self.model = model
            self.first = copy.deepcopy(model.state_dict()), x.clone(), y.clone(), adv.clone(), kw
        self.calls += 1
        return adv


def test_hybrid_loss_is_beta_clean_plus_one_minus_beta_adversarial(monkeypatch):
    spy = PgdSpy()
    monkeypatch.setattr(attacks, "pgd", spy)
    cfg = TrainConfig(epochs=1, lr=0.05, eval_every=0, adversarial_beta=0.3, adv_eps=0.1, adv_steps=3,
                      adv_step_size=0.04)
    _, hist = fit(small_mlp(), GpuLoader(tiny_split(64), 64, train=True), None, cfg, device="cpu",
                  progress=False)
    assert spy.calls == 1
    state, x, y, adv, kw = spy.first
    generator = kw.pop("generator")   # random starts of their own, saved with the run (resume: test_train)
    assert isinstance(generator, torch.Generator) and generator.initial_seed() == cfg.seed
    assert kw == dict(eps=0.1, step_size=0.04, steps=3, bn="eval", forward=spy.model)  # CPU: never compiled
    assert (adv - x).abs().max() <= 0.1 + 1e-6 and (adv != x).float().mean() > 0.5
    model = small_mlp()
    model.load_state_dict(state)
    with torch.no_grad():
        expected = 0.3 * F.cross_entropy(model(x), y) + 0.7 * F.cross_entropy(model(adv), y)
        clean = F.cross_entropy(model(x), y)
    assert hist["train_loss"].iloc[0] == pytest.approx(float(expected), rel=1e-5)
    assert float(expected) > float(clean) + 0.01      # the adversarial term is really in there


class Momentum(Callback):
    """The momentum buffers and weights at the end of every epoch."""

    def __init__(self):
        self.epochs = []

    def after_epoch(self, state):
        self.epochs.append({n: (w.detach().clone(), state.optimizer.state[w]["momentum_buffer"].clone())
                            for n, w in prunable_weights(state.model).items()})


def test_adversarial_training_keeps_the_masks(monkeypatch):
    spy = PgdSpy()
    monkeypatch.setattr(attacks, "pgd", spy)
    masks, mom = MaskCallback(PruneSpec(), 0.1, ramp_epochs=1), Momentum()
    cfg = TrainConfig(epochs=3, lr=0.05, eval_every=0, adversarial_beta=0.5, adv_steps=2)
    model, hist = fit(small_mlp(), GpuLoader(tiny_split(), 64, train=True, seed=1), None, cfg,
                      callbacks=[masks, mom], device="cpu", progress=False)
    assert spy.calls == 3 * 8                                  # one PGD per step
    total, nonzero = count_weights(model)
    assert nonzero == round(0.1 * total)
    assert hist["density"].tolist() == pytest.approx([nonzero / total] * 3, abs=1e-12)
    final = prunable_weights(model)
    for n, m in masks.masks.items():
        assert torch.equal(final[n].detach() != 0, m.bool()), n
        for w, buf in (e[n] for e in mom.epochs):
            assert (w[m == 0] == 0).all() and (buf[m == 0] == 0).all(), n
            assert (buf[m == 1] != 0).float().mean() > 0.5, n      # trained, not frozen


def test_train_config_rejects_bad_bn_statistics():
    with pytest.raises(ValueError, match="adv_bn_stats"):
        TrainConfig(adversarial_beta=0.5, adv_bn_stats="adversarial")
    with pytest.raises(ValueError, match="needs adversarial training"):
        TrainConfig(adv_bn_stats="clean")                    # beta 1: there is no adversarial half
    assert TrainConfig(adversarial_beta=0.5, adv_bn_stats="clean").adv_bn_stats == "clean"


@pytest.mark.parametrize("bn, shape", [(nn.BatchNorm2d(4), (6, 4, 5, 5)), (nn.BatchNorm1d(4), (6, 4))],
                         ids=["2d", "1d"])
def test_clean_statistics_normalise_both_halves_with_the_clean_ones(bn, shape):
    torch.manual_seed(0)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2), bn.bias.uniform_(-1, 1)
    plain = copy.deepcopy(bn)
    clean, adv = torch.randn(shape), 3 * torch.randn(shape) + 2     # the halves differ in mean and spread
    assert attacks.use_clean_statistics(bn) is bn and type(bn) is not type(plain)
    out = bn(torch.cat([clean, adv]))
    # The clean half is what a plain BatchNorm gives for the clean batch alone, running statistics included.
    assert torch.allclose(out[:6], plain(clean), atol=1e-5)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.allclose(getattr(bn, name), getattr(plain, name), atol=1e-6), name
    # The adversarial half is normalised with the clean half's mean and (biased) variance.
    dims = [0] + list(range(2, len(shape)))
    view = [1, -1] + [1] * (len(shape) - 2)
    mean, var = clean.mean(dims).view(view), clean.var(dims, unbiased=False).view(view)
    expected = (adv - mean) / torch.sqrt(var + bn.eps) * bn.weight.view(view) + bn.bias.view(view)
    assert torch.allclose(out[6:], expected, atol=1e-5)
    assert not torch.allclose(out[6:], copy.deepcopy(plain)(torch.cat([clean, adv]))[6:], atol=1e-2)  # not the mixture
    bn.eval(), plain.eval()
    assert torch.allclose(bn(adv), plain(adv), atol=1e-5)       # eval mode: the running statistics, as before
    attacks.use_clean_statistics(bn, on=False)
    assert type(bn) is type(plain) and bn.state_dict().keys() == plain.state_dict().keys()


def bn_digit_net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(4, 10))


@pytest.mark.parametrize("stats, attack_bn", [("mixed", "eval"), ("clean", "eval"), ("mixed", "batch"),
                                               ("clean", "batch")])
def test_fit_keeps_running_statistics_of_the_clean_half_only_when_asked(monkeypatch, stats, attack_bn):
    spy = PgdSpy()
    monkeypatch.setattr(attacks, "pgd", spy)
    cfg = TrainConfig(epochs=1, lr=0.05, eval_every=0, adversarial_beta=0.5, adv_steps=2, adv_bn_stats=stats,
                      adv_attack_bn=attack_bn)
    model, _ = fit(bn_digit_net(), GpuLoader(tiny_split(64), 64, train=True), None, cfg, device="cpu",
                   progress=False)
    assert type(model[1]) is nn.BatchNorm2d                     # plain again after fit
    start, x, _, adv, kw = spy.first
    assert kw["bn"] == attack_bn
    conv = nn.Conv2d(1, 4, 3)
    conv.load_state_dict({k[2:]: v for k, v in start.items() if k.startswith("0.")})
    with torch.no_grad():
        seen = conv(x if stats == "clean" else torch.cat([x, adv]))
    # One step from running mean 0: 0.1 × the batch mean of the images the statistics came from; a
    # batch-statistics attack's forwards add nothing to it.
    assert torch.allclose(model[1].running_mean, 0.1 * seen.mean((0, 2, 3)), atol=1e-6)


# ========================================================================= robust_evaluate

@pytest.fixture(scope="module")
def mnist():
    try:
        return D.load_split("mnist", True).subset(1024), D.load_split("mnist", False).subset(500)
    except DatasetMissingError as e:
        pytest.skip(f"MNIST not usable under {D.data_root()}: {e}")


def train_mlp(mnist, **adv):
    torch.manual_seed(0)
    model = create_model("mlp", hidden=(128, 64))
    cfg = TrainConfig(epochs=8, lr=0.1, eval_every=0, **adv)
    model, hist = fit(model, GpuLoader(mnist[0], 32, train=True), None, cfg, device="cpu", progress=False)
    return model, hist


@pytest.fixture(scope="module")
def trained(mnist):
    return train_mlp(mnist)


def test_pgd_lowers_the_accuracy_of_a_trained_model(mnist, trained):
    assert trained[1]["train_acc"].iloc[-1] > 95
    test = GpuLoader(mnist[1], 250, train=False)
    r = robust.robust_evaluate(trained[0], test, eps=0.1, pgd_step=0.025, device="cpu")
    assert r["test_images"] == 500
    assert r["clean"] == pytest.approx(evaluate(trained[0], test)["top1"], abs=1e-9)
    assert r["clean"] > 84
    assert r["fgsm"] < r["clean"] - 40
    assert r["pgd7"] < r["fgsm"] - 3 and r["pgd7"] < 30         # iterating beats one step
    assert r["pgd20"] <= r["pgd7"] + 0.5
    # at eps 0 no attack changes an image
    zero = robust.robust_evaluate(trained[0], test, eps=0.0, device="cpu")
    assert zero["fgsm"] == zero["pgd7"] == zero["pgd20"] == zero["clean"] == r["clean"]


def test_adversarial_training_makes_the_model_robust(mnist, trained):
    adv, hist = train_mlp(mnist, adversarial_beta=0.5, adv_eps=0.1, adv_step_size=0.025)
    test = GpuLoader(mnist[1], 250, train=False)
    plain = robust.robust_evaluate(trained[0], test, eps=0.1, pgd_step=0.025, attacks=("clean", "pgd7"),
                                   device="cpu")
    robust_ = robust.robust_evaluate(adv, test, eps=0.1, pgd_step=0.025, attacks=("clean", "pgd7"), device="cpu")
    assert robust_["pgd7"] > plain["pgd7"] + 25
    assert robust_["clean"] > plain["clean"] - 5


def test_robust_evaluate_is_deterministic_and_limits(mnist, trained):
    test = GpuLoader(mnist[1], 64, train=False)
    a = robust.robust_evaluate(trained[0], test, eps=0.1, pgd_step=0.025, limit=100, device="cpu")
    assert a == robust.robust_evaluate(trained[0], test, eps=0.1, pgd_step=0.025, limit=100, device="cpu")
    assert a["test_images"] == 100 and set(a) >= {"clean", "fgsm", "pgd7", "pgd20", "seed"}
    # a figure does not depend on which other attacks are measured with it
    only = robust.robust_evaluate(trained[0], test, eps=0.1, pgd_step=0.025, limit=100, attacks=("pgd20",),
                                  device="cpu")
    assert only["pgd20"] == a["pgd20"] and "clean" not in only
    with pytest.raises(ValueError, match="unknown attack"):
        robust.robust_evaluate(trained[0], test, attacks=("pgd",), device="cpu")


def test_robust_evaluate_on_the_cifar10_test_split():
    if not (D.data_root() / "cifar-10-batches-py").is_dir():
        pytest.skip(f"CIFAR-10 not found under {D.data_root()}")
    torch.manual_seed(0)
    model = create_model("vgg16")
    r = robust.robust_evaluate(model, "cifar10", limit=8, attacks=("clean", "fgsm"), device="cpu")
    first = GpuLoader(D.load_split("cifar10", False).subset(8), 8, train=False)
    assert r["test_images"] == 8 and r["eps"] == EPS and r["attack_dtype"] == "float32"
    assert r["clean"] == round(evaluate(model, first)["top1"], 2)
    x, y = next(iter(first))
    model.eval()
    fgsm = (model(attacks.fgsm(model, x, y)).argmax(1) == y).float().mean().item() * 100
    assert r["fgsm"] == round(fgsm, 2)


# ================================================================== figures in the shipped file

def shipped_mlp(tmp_path, smoke=False, test_images=100):
    model = small_mlp(hidden=(32, 16))
    with torch.no_grad():
        for w in prunable_weights(model).values():
            w[w.abs() < w.abs().quantile(0.9)] = 0.0
    path = tmp_path / "R1.etm"
    meta = {"row": "R1", "accuracy": 12.34, "test_images": test_images, "ratio": 10.0, "smoke": smoke,
            "dataset": "mnist", "granularity": "unstructured"}
    save_compressed(model, path, meta)
    return model, path, meta


def test_record_adds_the_figures_and_keeps_every_weight_byte(tmp_path):
    model, path, meta = shipped_mlp(tmp_path)
    before, payload = read_header(path), path.read_bytes()[-read_header(path)["payload_bytes"]:]
    figures = {"clean": 50.0, "fgsm": 20.0, "pgd7": 10.0, "test_images": 16, "eps": EPS, "pgd_step": 0.01,
               "seed": 0, "attack_device": "cpu", "attack_dtype": "float32"}
    robust.record(path, figures)
    after = read_header(path)
    assert after["meta"] == {**meta, "robust": figures}
    assert after["tensors"] == before["tensors"] and after["payload_crc32"] == before["payload_crc32"]
    assert path.read_bytes()[-after["payload_bytes"]:] == payload
    assert not list(tmp_path.glob(".*"))                       # no temporary file left behind
    back = load_compressed(path)
    for (n, a), b in zip(model.state_dict().items(), back.state_dict().values()):
        assert torch.equal(a, b), n


def test_measure_and_record_measures_the_file(mnist, tmp_path):
    model, path, _ = shipped_mlp(tmp_path)
    figures = robust.measure_and_record(path, limit=32, attacks=("clean", "pgd7"), device="cpu")
    again = robust.robust_evaluate(load_compressed(path), "mnist", limit=32, attacks=("clean", "pgd7"),
                                   device="cpu")
    assert read_header(path)["meta"]["robust"] == figures == again
    assert figures["clean"] == round(evaluate(model, GpuLoader(mnist[1].subset(32), 32, train=False))["top1"], 2)
    text = robust.agreement(figures, again)
    assert text.count("agrees within 0.0") == 2 and "DISAGREES" not in text
    assert "PGD-7" in robust.recorded_summary(read_header(path)["meta"])


def test_measure_file_of_a_smoke_run_uses_its_test_images(mnist, tmp_path):
    model, path, _ = shipped_mlp(tmp_path, smoke=True, test_images=100)
    r = robust.measure_file(path)
    assert r["test_images"] == 100
    assert r["accuracy"] == round(evaluate(model, GpuLoader(mnist[1].subset(100), 100, train=False))["top1"], 2)


def test_shipped_file_falls_back_to_the_smoke_file_until_one_is_committed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "TrainedModels").mkdir()
    smoke = tmp_path / "smoke" / "R1.etm"
    assert robust.shipped_file("R1", smoke) == smoke
    assert robust.shipped_file("R1") == tmp_path / "TrainedModels" / "R1.etm"
    (tmp_path / "TrainedModels" / "R1.etm").write_bytes(b"")
    assert robust.shipped_file("R1", smoke) == tmp_path / "TrainedModels" / "R1.etm"


def test_agreement_tolerances():
    rec = {"clean": 80.0, "fgsm": 50.0, "pgd7": 40.0, "test_images": 10000, "eps": EPS, "pgd_step": 0.01,
           "seed": 0, "attack_device": "cuda"}
    near = {**rec, "clean": 80.05, "fgsm": 50.3, "pgd7": 39.6}
    lines = robust.agreement(rec, near).splitlines()
    assert [line.split()[-3] for line in lines] == ["agrees", "agrees", "DISAGREES"]
    assert "within 0.05" in lines[0] and "within 0.3" in lines[2]
    cpu = {**rec, "attack_device": "cpu"}
    assert "DISAGREES" in robust.agreement(cpu, {**cpu, "pgd7": 40.01})
    assert robust.agreement(rec, {**rec, "test_images": 32}).startswith("  not comparable")


def test_dnr_table(tmp_path):
    _, path, _ = shipped_mlp(tmp_path)
    robust.record(path, {"clean": 85.5, "fgsm": 55.25, "pgd7": 48.0, "pgd20": 47.5, "test_images": 10000,
                         "eps": EPS, "pgd_step": 0.01, "seed": 0, "attack_device": "cuda",
                         "attack_dtype": "bfloat16"})
    model = load_compressed(path)
    t = robust.dnr_table({"R1": model})
    assert list(t.columns) == ["model", "sparsity", "compression", "clean %", "FGSM %", "PGD-7 %", "PGD-20 %",
                               "eps", "note"]
    ours, dnr = t.iloc[0], t.iloc[1]
    assert ours["model"].startswith("R1: VGG16 robust") and ours["sparsity"] == "unstructured"
    total, nonzero = count_weights(model)
    assert ours["compression"] == round(total / nonzero, 2)
    assert (ours["clean %"], ours["FGSM %"], ours["PGD-7 %"], ours["PGD-20 %"]) == (85.5, 55.25, 48.0, 47.5)
    assert (dnr["clean %"], dnr["compression"], dnr["eps"]) == (86.74, 20.0, "0.0310")
    assert pd.isna(dnr["PGD-7 %"]) and pd.isna(dnr["FGSM %"])          # DNR publishes none for VGG16


def test_robust_rows():
    from elastictrain.rows import ROWS
    for rid in ("R1", "R2"):
        r = ROWS[rid]
        assert (r.notebook, r.paper, r.paper_accuracy, r.paper_compression) == ("16_vgg16_robust", "DNR", 86.74, 20)
    assert "kernel" in ROWS["R2"].description and "unstructured" in ROWS["R2"].description  # DNR's anchor
