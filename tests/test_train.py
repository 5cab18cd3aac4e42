"""Tests for elastictrain.train: schedules, the fit loop, callbacks, resuming, evaluation and BN
recalibration. Training runs use a small MLP on a slice of MNIST ($ELASTICTRAIN_DATA), on the CPU."""
import math

import pandas as pd
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from elastictrain import checkpoints
from elastictrain import data as D
from elastictrain.accuracy import evaluate, recalibrate_bn
from elastictrain.data import DatasetMissingError, GpuLoader, Split
from elastictrain.models import create_model
from elastictrain.train import Callback, TrainConfig, fit

HISTORY_COLUMNS = ["epoch", "lr", "train_loss", "train_acc", "epoch_time_s", "test_top1", "test_loss"]


@pytest.fixture(autouse=True)
def private_checkpoints_dir(tmp_path, monkeypatch):
    """load_checkpoint consults checkpoints_dir()/MANIFEST: point it at an empty temp folder."""
    monkeypatch.setenv("ELASTICTRAIN_CHECKPOINTS", str(tmp_path / "ckpts"))


@pytest.fixture(scope="module")
def mnist():
    folder = D.data_root() / "MNIST"
    if not folder.is_dir():
        pytest.skip(f"MNIST not found at {folder} (set ELASTICTRAIN_DATA to the torchvision data root)")
    try:
        return D.load_split("mnist", True).subset(2048), D.load_split("mnist", False).subset(500)
    except DatasetMissingError as e:
        pytest.skip(f"MNIST not usable under {D.data_root()}: {e}")


def loaders(mnist, n_train=2048, bs=64, seed=0):
    train, test = mnist
    return (GpuLoader(train.subset(n_train), bs, train=True, seed=seed),
            GpuLoader(test, 250, train=False))


def small_mlp(seed=0):
    torch.manual_seed(seed)
    return create_model("mlp", hidden=(64, 32))


# --------------------------------------------------------------------------------------- schedules

def test_onecycle_schedule():
    cfg = TrainConfig(epochs=10, lr=0.2, schedule="onecycle", warmup=0.15)
    spe = 20  # 200 steps, warm-up ends at step 30
    lrs = [cfg.lr_at(s, spe) for s in range(200)]
    assert lrs[0] == pytest.approx(0.2 * 0.04)
    assert lrs[15] == pytest.approx(0.2 * (0.04 + 0.96 * 0.5))
    assert lrs[30] == pytest.approx(0.2)
    assert max(lrs) == lrs[30]
    assert all(a < b for a, b in zip(lrs[:30], lrs[1:31]))   # rising during warm-up
    assert all(a > b for a, b in zip(lrs[30:], lrs[31:]))    # then falling linearly
    assert lrs[-1] < 0.01 * 0.2
    assert lrs[-1] == pytest.approx(0.2 * (1 - (199 / 200 - 0.15) / 0.85))
    assert cfg.lr_at(200, spe) == pytest.approx(0.0, abs=1e-12)


def test_cosine_schedule():
    cfg = TrainConfig(epochs=4, lr=1.0, schedule="cosine", warmup=0.25)
    spe = 25
    assert cfg.lr_at(0, spe) == pytest.approx(0.04)
    assert cfg.lr_at(25, spe) == pytest.approx(1.0)
    assert cfg.lr_at(25 + 75 // 2, spe) == pytest.approx(0.5 * (1 + math.cos(math.pi * 37 / 75)))
    assert cfg.lr_at(99, spe) < 0.001


def test_step_schedule():
    cfg = TrainConfig(epochs=10, lr=0.5, schedule="step", milestones=(5, 8), gamma=0.1)
    spe = 7
    per_epoch = [{cfg.lr_at(e * spe + i, spe) for i in range(spe)} for e in range(10)]
    assert all(len(s) == 1 for s in per_epoch)  # constant within an epoch
    lrs = [s.pop() for s in per_epoch]
    assert lrs[:5] == [0.5] * 5
    assert lrs[5:8] == pytest.approx([0.05] * 3)
    assert lrs[8:] == pytest.approx([0.005] * 2)


def test_constant_schedule():
    cfg = TrainConfig(epochs=3, lr=0.3, schedule="constant")
    assert {cfg.lr_at(s, 10) for s in range(30)} == {0.3}


@pytest.mark.parametrize("kw", [{"schedule": "linear"}, {"epochs": 0}, {"lr": 0.0}, {"warmup": 1.0},
                                {"warmup": -0.1}])
def test_invalid_config_raises(kw):
    with pytest.raises(ValueError):
        TrainConfig(**kw)


# ---------------------------------------------------------------------------------------- fitting

@pytest.fixture(scope="module")
def mnist_run(mnist):
    train, test = loaders(mnist)
    model = small_mlp()
    cfg = TrainConfig(epochs=3, lr=0.1, seed=0)
    model, hist = fit(model, train, test, cfg, device="cpu", progress=False)
    return model, hist, train, test, cfg


def test_fit_history_shape_and_columns(mnist_run):
    _, hist, train, _, cfg = mnist_run
    assert isinstance(hist, pd.DataFrame)
    assert len(hist) == 3
    assert list(hist.columns) == HISTORY_COLUMNS
    assert hist["epoch"].tolist() == [1, 2, 3]
    spe = len(train)
    assert spe == 32
    # the recorded lr is the one of the epoch's last step
    assert hist["lr"].tolist() == pytest.approx([cfg.lr_at((e + 1) * spe - 1, spe) for e in range(3)])
    assert (hist["epoch_time_s"] > 0).all()


def test_fit_learns_mnist(mnist_run):
    model, hist, _, test, _ = mnist_run
    loss = hist["train_loss"].tolist()
    assert loss[0] < 0.9 * math.log(10)  # well below chance already after one epoch
    assert loss[2] < 0.5 * loss[0]
    assert hist["train_acc"].iloc[-1] > hist["train_acc"].iloc[0]
    assert hist["test_top1"].iloc[-1] > 60.0
    res = evaluate(model, test)
    # fit evaluates the final model: its last test figures are the final model's
    assert res["top1"] == pytest.approx(hist["test_top1"].iloc[-1])
    assert res["loss"] == pytest.approx(hist["test_loss"].iloc[-1], rel=1e-5)


def test_evaluate_fields(mnist_run):
    model, _, _, test, _ = mnist_run
    model.train()
    res = evaluate(model, test)
    assert set(res) == {"top1", "top5", "loss", "n"}
    assert res["n"] == 500
    assert 0 <= res["top1"] <= res["top5"] <= 100
    assert res["top5"] > 90
    assert res["loss"] > 0
    assert model.training  # the mode is restored
    # top1 recomputed by hand
    x = torch.cat([b for b, _ in test])
    y = torch.cat([b for _, b in test])
    with torch.no_grad():
        pred = model.eval()(x).argmax(1)
    assert res["top1"] == 100.0 * int((pred == y).sum()) / 500


def test_evaluate_on_dataset_name_uses_full_test_split(mnist_run):
    model, _, _, _, _ = mnist_run
    res = evaluate(model, "mnist")
    assert res["n"] == 10_000
    assert res["top1"] > 60.0


class ConstantModel(nn.Module):
    """Predicts the same logits for every input: class 3 first, then 1, 4, 5, 9, ..."""

    def __init__(self):
        super().__init__()
        order = [3, 1, 4, 5, 9, 2, 6, 8, 7, 0]
        logits = torch.zeros(10)
        for rank, c in enumerate(order):
            logits[c] = 10.0 - rank
        self.logits = nn.Parameter(logits)

    def forward(self, x):
        return self.logits.expand(len(x), -1)


def test_evaluate_constant_prediction_gives_class_frequency(mnist):
    _, test = mnist
    loader = GpuLoader(test, 128, train=False)  # 4 batches, the last one partial
    res = evaluate(ConstantModel(), loader)
    y = test.labels
    assert res["n"] == 500
    assert res["top1"] == 100.0 * int((y == 3).sum()) / 500
    assert res["top5"] == 100.0 * int(torch.isin(y, torch.tensor([3, 1, 4, 5, 9])).sum()) / 500
    logp = F.log_softmax(ConstantModel().logits.detach(), 0)
    assert res["loss"] == pytest.approx(float(-logp[y].mean()), rel=1e-6)
    assert 0 < res["top1"] < res["top5"] < 100


def test_evaluate_restores_tf32_flags_and_mode_when_interrupted(monkeypatch):
    """The TF32 switches are process-wide: a measurement stopped part-way must not leave the training
    that follows it without TF32, nor the model in eval mode."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", True)
    model = ConstantModel().train()

    def batches():
        yield torch.zeros(2, 1), torch.tensor([3, 1])
        assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        evaluate(model, batches())
    assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32
    assert model.training


# -------------------------------------------------------------------------------------- callbacks

class Counting(Callback):
    def __init__(self):
        self.calls = {"on_train_begin": 0, "before_epoch": 0, "after_step": 0, "after_epoch": 0}
        self.steps_seen = []

    def on_train_begin(self, state):
        self.calls["on_train_begin"] += 1

    def before_epoch(self, state):
        self.calls["before_epoch"] += 1

    def after_step(self, state):
        self.calls["after_step"] += 1
        self.steps_seen.append(state.step)

    def after_epoch(self, state):
        self.calls["after_epoch"] += 1
        state.metrics["x"] = 10 * state.epoch + 0.5


def test_callback_hooks_and_metrics_column(mnist):
    train, test = loaders(mnist, n_train=512, bs=64)
    cb = Counting()
    _, hist = fit(small_mlp(), train, test, TrainConfig(epochs=2, lr=0.05), callbacks=[cb],
                  device="cpu", progress=False)
    assert len(train) == 8
    assert cb.calls == {"on_train_begin": 1, "before_epoch": 2, "after_step": 16, "after_epoch": 2}
    assert cb.steps_seen == list(range(1, 17))
    assert list(hist.columns) == HISTORY_COLUMNS + ["x"]
    assert hist["x"].tolist() == [10.5, 20.5]


class ZeroOneWeight(Callback):
    def after_step(self, state):
        with torch.no_grad():
            state.model.fc1.weight[5, 7] = 0.0


def test_callback_can_keep_a_weight_at_zero(mnist):
    train, test = loaders(mnist, n_train=512, bs=64)
    model = small_mlp()
    before = model.fc1.weight.detach().clone()
    assert before[5, 7] != 0
    model, _ = fit(model, train, test, TrainConfig(epochs=2, lr=0.05), callbacks=[ZeroOneWeight()],
                   device="cpu", progress=False)
    w = model.fc1.weight.detach()
    assert w[5, 7] == 0.0
    changed = (w != before)
    changed[5, 7] = False
    assert int(changed.sum()) > 0.9 * w.numel()  # everything else trained
    # and without the callback that weight moves
    model2, _ = fit(small_mlp(), train, test, TrainConfig(epochs=2, lr=0.05), device="cpu", progress=False)
    assert model2.fc1.weight[5, 7] != 0


# --------------------------------------------------------------------------------------- resuming

def test_resume_from_checkpoint(mnist, tmp_path):
    path = tmp_path / "run.pt"
    train, test = loaders(mnist, n_train=512, bs=64)
    cb1 = Counting()
    _, hist2 = fit(small_mlp(seed=1), train, test, TrainConfig(epochs=2, lr=0.05, checkpoint_every=1),
                   callbacks=[cb1], device="cpu", checkpoint_path=path, progress=False)
    assert len(hist2) == 2 and path.is_file()
    ck = checkpoints.load_checkpoint(path)
    assert ck["epoch"] == 2 and ck["extra"]["step"] == 16
    assert ck["arch"] == {"name": "mlp", "kwargs": {"hidden": [64, 32]}}

    train, test = loaders(mnist, n_train=512, bs=64)
    cb2 = Counting()
    model4, hist4 = fit(small_mlp(seed=2), train, test,
                        TrainConfig(epochs=4, lr=0.05, checkpoint_every=1), callbacks=[cb2],
                        device="cpu", checkpoint_path=path, progress=False)
    assert len(hist4) == 4
    assert hist4["epoch"].tolist() == [1, 2, 3, 4]
    pd.testing.assert_frame_equal(hist4.iloc[:2].reset_index(drop=True), hist2, check_exact=True)
    # resumed: no new on_train_begin, only the two remaining epochs ran
    assert cb2.calls["on_train_begin"] == 0
    assert cb2.calls["after_epoch"] == 2
    assert cb2.steps_seen == list(range(17, 33))
    assert hist4["x"].tolist() == [10.5, 20.5, 30.5, 40.5]

    ck = checkpoints.load_checkpoint(path, expected_arch="mlp")
    assert ck["epoch"] == 4 and ck["extra"]["step"] == 32
    assert len(ck["extra"]["history"]) == 4
    sd = model4.state_dict()
    assert list(ck["state_dict"]) == list(sd)
    assert all(torch.equal(ck["state_dict"][k], sd[k]) for k in sd)
    assert ck["optimizer"] is not None and ck["extra"]["config"]["epochs"] == 4

    # a finished run resumes to a no-op that returns the saved model and history
    model_again, hist_again = fit(small_mlp(seed=3), train, test,
                                  TrainConfig(epochs=4, lr=0.05, checkpoint_every=1),
                                  device="cpu", checkpoint_path=path, progress=False)
    pd.testing.assert_frame_equal(hist_again, hist4, check_exact=True)
    assert torch.equal(model_again.fc3.weight, model4.fc3.weight)


def test_empty_loader_raises(mnist):
    train, test = mnist
    loader = GpuLoader(train.subset(100), 256, train=True)
    assert len(loader) == 0
    with pytest.raises(ValueError, match="no batch"):
        fit(small_mlp(), loader, None, TrainConfig(epochs=1), device="cpu", progress=False)


# --------------------------------------------------------------------------------- BN recalibration

def test_recalibrate_bn_vgg16():
    torch.manual_seed(0)
    model = create_model("vgg16").eval()
    g = torch.Generator().manual_seed(0)
    split = Split(torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8, generator=g),
                  torch.zeros(16, dtype=torch.int64), "random")
    loader = GpuLoader(split, 8, train=False)
    bn = model.features[1]
    with torch.no_grad():
        bn.running_mean.fill_(7.0)  # stale statistics, to be replaced
    out = recalibrate_bn(model, loader, batches=2)
    assert out is model
    assert not model.training  # mode restored
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(m.momentum == 0.1 for m in bns)
    assert all(int(m.num_batches_tracked) == 2 for m in bns)
    assert not torch.equal(bn.running_mean, torch.zeros(64))  # moved from the reset state
    # momentum=None: the cumulative average of the two batch means of conv1's output
    conv = model.features[0]
    with torch.no_grad():
        means = [conv(model.normalize(x)).mean((0, 2, 3)) for x, _ in loader]
    torch.testing.assert_close(bn.running_mean, (means[0] + means[1]) / 2, rtol=1e-4, atol=1e-5)


def test_recalibrate_bn_only_uses_requested_batches():
    torch.manual_seed(0)
    model = create_model("resnet56", widths=[4] * 27)
    split = Split(torch.randint(0, 256, (40, 3, 32, 32), dtype=torch.uint8), torch.zeros(40, dtype=torch.int64), "r")
    recalibrate_bn(model, GpuLoader(split, 8, train=False), batches=3)
    assert model.training
    assert int(model.bn1.num_batches_tracked) == 3
    mlp = create_model("mlp", hidden=(4, 4))
    assert recalibrate_bn(mlp, GpuLoader(split, 8, train=False)) is mlp  # no BN: a no-op


def test_resume_restores_loader_rng_and_before_epoch_metrics(tmp_path):
    """A resumed run draws the same batches as an uninterrupted one, and columns a callback sets in
    before_epoch reach the history."""
    from elastictrain.data import GpuLoader, Split

    g = torch.Generator().manual_seed(0)
    split = Split(torch.randint(0, 256, (256, 1, 28, 28), dtype=torch.uint8, generator=g),
                  torch.randint(0, 10, (256,), generator=g), "tiny")

    class Seen(Callback):
        def __init__(self):
            self.first = []

        def before_epoch(self, state):
            state.metrics["marker"] = 7.0

    def run(epochs, path, seen):
        loader = GpuLoader(split, 64, train=True, crop_pad=2, seed=3)
        orig = loader._batch
        loader._batch = lambda idx: (seen.first.append(idx.clone()), orig(idx))[1]
        torch.manual_seed(0)
        model = create_model("mlp", hidden=(8, 8))
        return fit(model, loader, None, TrainConfig(epochs=epochs, lr=0.05, checkpoint_every=1),
                   callbacks=[seen], checkpoint_path=path, progress=False)

    straight = Seen()
    run(3, None, straight)
    cut = Seen()
    run(2, tmp_path / "run.pt", cut)
    resumed = Seen()
    _, hist = run(3, tmp_path / "run.pt", resumed)
    per_epoch = len(straight.first) // 3
    assert len(resumed.first) == per_epoch
    for a, b in zip(resumed.first, straight.first[2 * per_epoch:]):
        assert torch.equal(a, b)
    assert list(hist["marker"]) == [7.0, 7.0, 7.0]


@pytest.mark.parametrize("kw", [dict(mixup=1.0), dict(adversarial_beta=0.5, adv_steps=2)], ids=["mixup", "pgd"])
def test_a_resumed_run_ends_with_the_weights_of_an_uninterrupted_one(mnist, tmp_path, kw):
    """Mixup's draws and training PGD's random starts come from generators saved with the checkpoint (fit
    reseeds the global stream at its start, so a resumed run cannot rely on it)."""
    cfg = TrainConfig(epochs=2, lr=0.05, checkpoint_every=1, eval_every=0, **kw)

    class Interrupt(Callback):
        def before_epoch(self, state):
            if state.epoch == 1:
                raise KeyboardInterrupt

    def run(path, *callbacks):
        train, _ = loaders(mnist, n_train=128, bs=64)
        return fit(small_mlp(), train, None, cfg, callbacks=list(callbacks), device="cpu", checkpoint_path=path,
                   progress=False)[0]

    straight = run(None)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "run.pt", Interrupt())
    resumed = run(tmp_path / "run.pt")
    for (n, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), n


# ------------------------------------------------------------------------------- distillation

def test_distillation_needs_teacher_and_alpha(mnist):
    train, test = loaders(mnist, n_train=128, bs=64)
    with pytest.raises(ValueError, match="teacher"):
        fit(small_mlp(), train, test, TrainConfig(epochs=1, distill_alpha=0.5), device="cpu", progress=False)
    with pytest.raises(ValueError, match="teacher"):
        fit(small_mlp(), train, test, TrainConfig(epochs=1), device="cpu", progress=False, teacher=small_mlp())
    with pytest.raises(ValueError, match="distill_alpha"):
        TrainConfig(distill_alpha=1.5)


def test_distill_loss_values():
    from elastictrain.objectives import _distill
    out = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 0.0]])
    teacher = nn.Identity()
    ce = torch.tensor(1.25)
    cfg = TrainConfig(distill_alpha=0.75, distill_temperature=2.0)
    # the student equal to the teacher: KL = 0, only the CE part remains
    assert _distill(ce, out, teacher, out, cfg).item() == pytest.approx(0.25 * 1.25)
    t_logits = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    p_t = F.softmax(t_logits / 2, 1)
    kl = (p_t * (p_t.log() - F.log_softmax(out / 2, 1))).sum(1).mean()
    assert _distill(ce, out, teacher, t_logits, cfg).item() == pytest.approx(0.25 * 1.25 + 0.75 * 4 * kl.item(), rel=1e-6)


def test_objective_distils_only_the_clean_term_of_the_hybrid_loss():
    from elastictrain.objectives import _distill, objective
    g = torch.Generator().manual_seed(0)
    out, out_adv, t_logits = (torch.randn(6, 4, generator=g) for _ in range(3))
    y = torch.tensor([0, 1, 2, 3, 0, 1])
    ce, ce_adv = F.cross_entropy(out, y), F.cross_entropy(out_adv, y)
    plain = TrainConfig(adversarial_beta=0.3)
    assert objective(out, None, y, None, None, TrainConfig()).item() == pytest.approx(ce.item())
    assert objective(out, out_adv, y, None, None, plain).item() == pytest.approx(0.3 * ce.item() + 0.7 * ce_adv.item())
    cfg = TrainConfig(adversarial_beta=0.3, distill_alpha=0.75, distill_temperature=2.0)
    kd = _distill(ce, out, nn.Identity(), t_logits, cfg)
    # the adversarial term keeps its weight 0.7; distillation reshapes the clean 0.3 only
    assert objective(out, out_adv, y, t_logits, nn.Identity(), cfg).item() == pytest.approx(
        0.3 * kd.item() + 0.7 * ce_adv.item(), rel=1e-6)
    # a teacher equal to the student leaves (1 - alpha)·CE of the clean term
    assert objective(out, out_adv, y, out, nn.Identity(), cfg).item() == pytest.approx(
        0.3 * 0.25 * ce.item() + 0.7 * ce_adv.item(), rel=1e-6)
    assert objective(out, None, y, t_logits, nn.Identity(), cfg).item() == pytest.approx(kd.item(), rel=1e-6)


def test_distillation_pulls_the_student_towards_the_teacher(mnist):
    train, test = loaders(mnist, n_train=512, bs=64)
    teacher, _ = fit(small_mlp(), train, test, TrainConfig(epochs=2, lr=0.05), device="cpu", progress=False)
    plain, _ = fit(small_mlp(1), train, test, TrainConfig(epochs=1, lr=0.05), device="cpu", progress=False)
    kd, _ = fit(small_mlp(1), train, test, TrainConfig(epochs=1, lr=0.05, distill_alpha=1.0), device="cpu",
                progress=False, teacher=teacher)
    x = next(iter(test))[0]

    def gap(m):
        with torch.no_grad():
            return F.kl_div(F.log_softmax(m(x), 1), F.log_softmax(teacher(x), 1), log_target=True,
                            reduction="batchmean").item()
    assert gap(kd) < gap(plain)


def test_compiled_forward_is_skipped_while_deferred():
    from elastictrain.graphs import TrainingForward
    m = small_mlp()
    c = TrainingForward("reduce-overhead")
    assert c(m, eager=True) is m and c.source is None      # nothing compiled while deferred
    assert TrainingForward(None)(m) is m                   # no mode: always the eager module


def test_deferred_forward_is_graphed_per_model():
    from elastictrain.graphs import GraphedForward, TrainingForward
    m, m2 = small_mlp(), small_mlp(1)
    c = TrainingForward("reduce-overhead", graph_when_deferred=True)
    g = c(m, eager=True)
    assert isinstance(g, GraphedForward) and g.model is m and g.fn is None  # captured at its first call
    assert c(m, eager=True) is g                           # one capture per model, not per step
    assert c(m2, eager=True).model is m2                   # a pruned model gets its own graph
    assert c(m2) is not m2 and c.graphed is None           # then compiled, the graph released
    # graphs only stand in for CUDA-graph mode
    assert TrainingForward("max-autotune", graph_when_deferred=True)(m, eager=True) is m


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU (run on the device machine)")
@pytest.mark.parametrize("amp", [False, True])
def test_graphed_training_matches_eager(amp):
    """Steps through the graph give the eager steps' weights and BatchNorm statistics; the capture's
    warm-up forwards leave the running statistics as they were."""
    from elastictrain.graphs import GraphedForward
    from elastictrain.precision import autocast
    from elastictrain.train import prepare_model
    dev = torch.device("cuda")

    def net():
        torch.manual_seed(0)
        return prepare_model(nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                           nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10)), dev).train()
    torch.manual_seed(1)
    xs = [torch.randn(32, 3, 8, 8, device=dev).contiguous(memory_format=torch.channels_last) for _ in range(6)]
    ys = [torch.randint(0, 10, (32,), device=dev) for _ in range(6)]
    models = []
    for graphed in (False, True):
        m = net()
        opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
        fwd = GraphedForward(m, amp) if graphed else m
        for i, (x, y) in enumerate(zip(xs, ys)):
            if graphed and i == 0:
                before = [b.clone() for b in m.buffers()]
            with autocast(dev, amp):
                loss = F.cross_entropy(fwd(x).float(), y)
            if graphed and i == 0:  # warm-ups undone: one step's update of the running mean, not four
                assert fwd.fn is not None
                assert not torch.equal(m[1].running_mean, before[0])
                assert m[1].num_batches_tracked.item() == 1
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        models.append(m)
    tol = 2e-2 if amp else 1e-4
    for a, b in zip(models[0].state_dict().values(), models[1].state_dict().values()):
        assert torch.allclose(a.float(), b.float(), atol=tol, rtol=tol)
    assert models[1][1].num_batches_tracked.item() == 6


# ------------------------------------------------------------------------------------- mixup

def test_mixup_mixes_the_batch_with_a_permutation_of_itself():
    import numpy as np
    from elastictrain.objectives import mixup
    x = torch.arange(12.0).reshape(6, 2)
    mixed, (perm, lam) = mixup(x, 1.0, np.random.default_rng(3))
    assert sorted(perm.tolist()) == list(range(6)) and 0 < lam < 1
    assert torch.allclose(mixed, lam * x + (1 - lam) * x[perm])
    again, (perm2, lam2) = mixup(x, 1.0, np.random.default_rng(3))
    assert lam2 == lam and torch.equal(perm2, perm) and torch.equal(again, mixed)
    # a small alpha puts lam near 0 or 1: the mix stays close to one of its two images
    lams = [mixup(x, 0.05, np.random.default_rng(s))[1][1] for s in range(50)]
    assert np.mean([min(v, 1 - v) for v in lams]) < 0.1


def test_objective_mixes_the_cross_entropy_like_the_images():
    from elastictrain.objectives import objective
    g = torch.Generator().manual_seed(0)
    out = torch.randn(6, 4, generator=g)
    y = torch.tensor([0, 1, 2, 3, 0, 1])
    perm = torch.tensor([5, 4, 3, 2, 1, 0])
    cfg = TrainConfig(mixup=1.0)
    want = 0.3 * F.cross_entropy(out, y) + 0.7 * F.cross_entropy(out, y[perm])
    assert objective(out, None, y, None, None, cfg, (perm, 0.3)).item() == pytest.approx(want.item(), rel=1e-6)
    # lam = 1 is no mixing at all
    assert objective(out, None, y, None, None, cfg, (perm, 1.0)).item() == pytest.approx(
        F.cross_entropy(out, y).item(), rel=1e-6)


def test_mixup_config_is_checked():
    with pytest.raises(ValueError, match="mixup"):
        TrainConfig(mixup=-0.5)
    with pytest.raises(ValueError, match="adversarial"):
        TrainConfig(mixup=1.0, adversarial_beta=0.5)


class _Recorder(nn.Module):
    """A teacher that remembers what it was shown."""

    def __init__(self, model):
        super().__init__()
        self.model, self.seen = model, []

    def forward(self, x):
        self.seen.append(x.detach().clone())
        return self.model(x)


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_the_teacher_labels_the_mixed_images(mnist, alpha):
    train, test = loaders(mnist, n_train=128, bs=64)
    originals = torch.cat([x for x, _ in GpuLoader(mnist[0].subset(128), 64, train=False)]).flatten(1)
    teacher = _Recorder(small_mlp(1))
    fit(small_mlp(), train, test, TrainConfig(epochs=1, lr=0.05, distill_alpha=0.5, mixup=alpha), device="cpu",
        progress=False, teacher=teacher)
    seen = torch.cat(teacher.seen).flatten(1)
    assert len(seen) == 128
    # nearest training image of each image the teacher saw: itself without mixup; with it, far from
    # any but for the few a permutation maps onto themselves
    nearest = torch.cdist(seen, originals, compute_mode="donot_use_mm_for_euclid_dist").min(1).values
    if alpha == 0:
        assert nearest.max().item() < 1e-5
    else:
        assert (nearest > 0.1).float().mean().item() > 0.9


# ------------------------------------------------------------------------------ attention transfer

def tiny_vgg(seed):
    torch.manual_seed(seed)
    return create_model("vgg16", widths=[8] * 13)


def cifar_like(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return Split(torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g),
                 torch.randint(0, 10, (n,), generator=g), "random")


def test_vgg_forward_with_maps_gives_the_logits_and_the_inputs_of_the_five_pools():
    model = tiny_vgg(0).eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        logits, maps = model.forward_with_maps(x)
        assert torch.equal(logits, model(x))
        first = model.features[:6](model.normalize(x))   # conv-BN-ReLU twice, then the first max-pool
    assert [tuple(m.shape) for m in maps] == [(2, 8, 32, 32), (2, 8, 16, 16), (2, 8, 8, 8), (2, 8, 4, 4), (2, 8, 2, 2)]
    assert isinstance(model.features[6], nn.MaxPool2d) and torch.equal(maps[0], first)


def test_attention_transfer_values():
    from elastictrain.objectives import attention, attention_transfer
    s = torch.zeros(1, 2, 8, 8)
    s[0, :, 0, 0] = 1.0                      # all activation at the top-left position
    t = torch.zeros(1, 5, 8, 8)
    t[0, :, 0, 1] = 2.0                      # the teacher's (5 channels) at the next one
    assert torch.equal(attention(s), F.one_hot(torch.tensor([0]), 64).float())
    # (1 - 0)² + (0 - 1)² over 64 positions, per map
    assert attention_transfer([s], [t]).item() == pytest.approx(2 / 64)
    assert attention_transfer([s, 3 * s], [t, t]).item() == pytest.approx(4 / 64)   # scale-free
    assert attention_transfer([s], [s]).item() == 0.0
    with pytest.raises(ValueError, match="spatial"):
        attention_transfer([s], [torch.zeros(1, 2, 16, 16)])
    with pytest.raises(ValueError, match="maps"):
        attention_transfer([s, s], [t])


def test_attention_transfer_compares_maps_of_side_8_and_more():
    from elastictrain.objectives import MIN_SIDE, attention_transfer
    g = torch.Generator().manual_seed(0)
    big, small = (torch.rand(2, 3, n, n, generator=g) for n in (MIN_SIDE, MIN_SIDE // 2))
    other_big, other_small = (torch.rand(2, 3, n, n, generator=g) for n in (MIN_SIDE, MIN_SIDE // 2))
    only_big = attention_transfer([big], [other_big]).item()
    assert only_big > 0
    assert attention_transfer([big, small], [other_big, other_small]).item() == pytest.approx(only_big)
    assert attention_transfer([small], [other_small]) == 0.0


def test_objective_adds_half_beta_times_the_attention_transfer():
    from elastictrain.objectives import attention_transfer, objective
    student, teacher = tiny_vgg(0), tiny_vgg(1).eval()
    x, y = torch.rand(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    out, maps = student.forward_with_maps(x)
    with torch.no_grad():
        at = attention_transfer(maps, teacher.forward_with_maps(x)[1]).item()
    plain = objective(out, None, y, x, teacher, TrainConfig(distill_alpha=0.5)).item()
    both = objective(out, None, y, x, teacher, TrainConfig(distill_alpha=0.5, attention_beta=1000.0), None, maps).item()
    assert at > 0 and both - plain == pytest.approx(500.0 * at, rel=1e-5)


@pytest.mark.parametrize("kw, match", [
    (dict(attention_beta=-1.0), "attention_beta"),
    (dict(attention_beta=1000.0), "distill_alpha"),                              # no teacher
    (dict(attention_beta=1000.0, distill_alpha=0.5, adversarial_beta=0.5), "adversarial_beta"),
    (dict(attention_beta=1000.0, distill_alpha=0.5, bn_splits=2), "bn_splits"),
])
def test_attention_transfer_config_is_checked(kw, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**kw)


def test_attention_transfer_refuses_models_without_maps():
    loader = GpuLoader(cifar_like(8), 8, train=False)
    cfg = TrainConfig(epochs=1, lr=0.01, distill_alpha=0.5, attention_beta=1000.0)
    resnet = create_model("resnet56", widths=[4] * 27)
    with pytest.raises(ValueError, match="student.*forward_with_maps"):
        fit(resnet, loader, None, cfg, device="cpu", progress=False, teacher=tiny_vgg(1))
    with pytest.raises(ValueError, match="teacher.*forward_with_maps"):
        fit(tiny_vgg(0), loader, None, cfg, device="cpu", progress=False, teacher=resnet)


def test_fit_trains_on_the_attention_transfer_term():
    """One step on one batch: the recorded loss differs from plain distillation's by exactly
    beta/2 times the attention transfer of the untrained student (train-mode BN) and the teacher."""
    import copy
    from elastictrain.objectives import attention_transfer
    loader = GpuLoader(cifar_like(8), 8, train=False)
    teacher = tiny_vgg(1).eval()
    x, _ = next(iter(loader))
    with torch.no_grad():
        at = attention_transfer(copy.deepcopy(tiny_vgg(0)).train().forward_with_maps(x)[1],
                                teacher.forward_with_maps(x)[1]).item()
    losses = {}
    for beta in (0.0, 1000.0):
        cfg = TrainConfig(epochs=1, lr=0.01, distill_alpha=0.5, attention_beta=beta)
        _, hist = fit(tiny_vgg(0), loader, None, cfg, device="cpu", progress=False, teacher=teacher)
        losses[beta] = hist["train_loss"].iloc[0]
    assert at > 0 and losses[1000.0] - losses[0.0] == pytest.approx(500.0 * at, rel=1e-4)
