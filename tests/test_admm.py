"""Tests for elastictrain.prune.admm: the progressive ADMM schedule (spec §5.8c) inside ``fit``:
stage densities, the scaled dual update, the decoupled per-step pull, hard projections to exact
counts, masks that only shrink, and resume. A small MLP on random MNIST-shaped images, on the CPU."""
import math
from types import SimpleNamespace

import pytest
import torch

from elastictrain.data import GpuLoader
from elastictrain.metrics import count_weights
from elastictrain.models.common import prunable_weights
from elastictrain.prune import ADMMCallback, AdmmSchedule, PruneSpec, make_masks
from elastictrain.prune.recipe import PruneRecipe
from elastictrain.train import Callback, TrainConfig, fit
from test_prune import MLP_N, StopAt, small_mlp, tiny_split

SCHEDULE = AdmmSchedule(stages=2, admm_epochs=2, retrain_epochs=1, rho=0.5, update_every=1)
CFG = TrainConfig(epochs=6, lr=0.05, checkpoint_every=1, eval_every=0, schedule="constant")
TARGET = 0.1


@pytest.fixture(autouse=True)
def private_checkpoints_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("ELASTICTRAIN_CHECKPOINTS", str(tmp_path / "ckpts"))


class Snapshots(Callback):
    """Each epoch's masks (after ``before_epoch``) and weights (after the epoch)."""

    def __init__(self, cb):
        self.cb, self.masks, self.weights = cb, [], []

    def before_epoch(self, state):
        self.masks.append({n: m.bool().clone() for n, m in self.cb.masks.items()})

    def after_epoch(self, state):
        self.weights.append({n: w.detach().clone() for n, w in prunable_weights(state.model).items()})


def run(cb, *extra, path=None, seed=0):
    loader = GpuLoader(tiny_split(), 64, train=True, seed=1)
    return fit(small_mlp(seed), loader, None, CFG, callbacks=[cb, snap := Snapshots(cb), *extra], device="cpu",
               checkpoint_path=path, progress=False) + (snap,)


@pytest.fixture(scope="module")
def admm_run():
    cb = ADMMCallback(PruneSpec(), TARGET, SCHEDULE)
    model, history, snap = run(cb)
    return cb, model, history, snap


def test_schedule_epochs_and_refusals():
    assert AdmmSchedule().epochs == 3 * 40 + 2 * 60      # the last stage's retraining is the row's fine-tuning
    assert SCHEDULE.epochs == 5
    for bad in ({"stages": 0}, {"admm_epochs": 0}, {"retrain_epochs": -1}, {"update_every": 0}, {"rho": 0.0},
                {"rho_growth": 0.9}):
        with pytest.raises(ValueError, match="need"):
            AdmmSchedule(**bad)
    with pytest.raises(ValueError, match="unstructured"):
        ADMMCallback(PruneSpec("kernel"), 0.1, SCHEDULE)


def test_recipe_ties_the_ramp_to_the_schedule():
    train = TrainConfig(epochs=300, schedule="cosine", warmup=0.0, hold=0.8)
    ok = PruneRecipe(row="E2b", spec=PruneSpec(), ratio=1000, ramp_epochs=240, base="E2", train=train,
                     admm=AdmmSchedule())
    assert ok.smoke().admm.epochs == ok.smoke().ramp_epochs == 1
    with pytest.raises(ValueError, match=r"ramp_epochs must be the ADMM schedule's pruning epochs \(240, got 150\)"):
        PruneRecipe(row="E2b", spec=PruneSpec(), ratio=1000, ramp_epochs=150, base="E2", train=train,
                    admm=AdmmSchedule())
    with pytest.raises(ValueError, match="rewire"):
        PruneRecipe(row="E2b", spec=PruneSpec(), ratio=1000, ramp_epochs=240, base="E2", train=train,
                    admm=AdmmSchedule(), rewire=0.3)


def test_densities_follow_the_stages_and_end_exact(admm_run):
    cb, model, history, snap = admm_run
    d0 = math.sqrt(TARGET)                   # stage 0's density: geometric half way from 1 to 0.1
    assert cb.stage_density(0) == pytest.approx(d0) and cb.stage_density(1) == pytest.approx(TARGET)
    # epochs 0-1: stage 0's ADMM (mask untouched), 2: its projection, 3-4: stage 1's ADMM, 5: projection
    expect = [1.0, 1.0, round(d0 * MLP_N) / MLP_N, round(d0 * MLP_N) / MLP_N, round(d0 * MLP_N) / MLP_N,
              round(TARGET * MLP_N) / MLP_N]
    assert history["density"].tolist() == pytest.approx(expect, abs=1e-12)
    assert count_weights(model) == (MLP_N, round(TARGET * MLP_N))
    assert cb.z is None                                          # the penalty is off after the last projection
    # the pull shows: ρ grew by 1.3 per renewal within a stage, and is logged only while it is on
    assert history["rho"].iloc[:2].tolist() == pytest.approx([0.5, 0.65])
    assert history["rho"].iloc[3:5].tolist() == pytest.approx([0.5, 0.65])
    assert history["rho"].iloc[[2, 5]].isna().all()


def test_masks_only_shrink_and_pruned_weights_stay_zero(admm_run):
    cb, model, history, snap = admm_run
    for before, after in zip(snap.masks, snap.masks[1:]):
        for n in before:
            assert (after[n] <= before[n]).all(), n
    for masks, weights in zip(snap.masks, snap.weights):
        for n, w in weights.items():
            assert (w[~masks[n]] == 0).all(), n
    final = prunable_weights(model)
    for n, m in cb.masks.items():
        assert torch.equal(final[n].detach() != 0, m.bool()), n


def test_penalty_pulls_the_weights_to_be_pruned_towards_zero():
    """With the penalty on, the weights outside Z's support shrink against a run with ρ ≈ 0."""
    def outside_norm(rho):
        cb = ADMMCallback(PruneSpec(), TARGET, AdmmSchedule(stages=1, admm_epochs=3, retrain_epochs=0, rho=rho,
                                                            update_every=1))
        loader = GpuLoader(tiny_split(), 64, train=True, seed=1)
        model, _ = fit(small_mlp(), loader, None, TrainConfig(epochs=2, lr=0.05, eval_every=0, schedule="constant"),
                       callbacks=[cb], device="cpu", progress=False)
        w = prunable_weights(model)
        keep = make_masks(w, TARGET, PruneSpec())
        return sum(float(w[n].detach()[~keep[n]].pow(2).sum()) for n in w) ** 0.5
    assert outside_norm(5.0) < 0.5 * outside_norm(1e-9)


def test_dual_update_and_decoupled_step_are_exact():
    torch.manual_seed(0)
    model = small_mlp()
    cb = ADMMCallback(PruneSpec(), TARGET, SCHEDULE)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    state = SimpleNamespace(model=model, optimizer=opt, epoch=0, metrics={})
    cb.on_train_begin(state)
    cb.before_epoch(state)                                       # stage 0, first renewal: Z = Proj(W), U = 0
    w = {n: t.detach().clone() for n, t in prunable_weights(model).items()}
    keep = make_masks(w, cb.stage_density(0), PruneSpec())
    for z, u, n in zip(cb.z, cb.u, w):
        assert torch.equal(z, w[n] * keep[n]) and not u.any(), n
    assert cb.rho == 0.5
    cb.after_step(state)                                         # W ← W − lr·ρ·(W − Z + U)
    for z, (n, t) in zip(cb.z, prunable_weights(model).items()):
        torch.testing.assert_close(t.detach(), w[n] - 0.1 * 0.5 * (w[n] - z), rtol=0, atol=1e-7)
    w1 = {n: t.detach().clone() for n, t in prunable_weights(model).items()}
    u0 = [u.clone() for u in cb.u]
    state.epoch = 1
    cb.before_epoch(state)                                       # Z = Proj(W + U), U ← (U + W − Z)·ρ/ρ'
    target = {n: w1[n] + u for n, u in zip(w1, u0)}
    keep = make_masks(target, cb.stage_density(0), PruneSpec())
    for z, u, u_old, n in zip(cb.z, cb.u, u0, w1):
        assert torch.equal(z, target[n] * keep[n]), n
        torch.testing.assert_close(u, (u_old + w1[n] - z) / 1.3, rtol=0, atol=1e-7)
    assert cb.rho == pytest.approx(0.65)


@pytest.mark.parametrize("stop", [1, 4])          # inside stage 0's ADMM, inside stage 1's
def test_resume_matches_the_uninterrupted_run(admm_run, tmp_path, stop):
    _, straight, hist_straight, _ = admm_run
    path = tmp_path / "run.pt"
    with pytest.raises(KeyboardInterrupt):
        run(ADMMCallback(PruneSpec(), TARGET, SCHEDULE), StopAt(stop), path=path)
    cb = ADMMCallback(PruneSpec(), TARGET, SCHEDULE)
    model, hist, _ = run(cb, path=path, seed=5)                 # a different init: the file must win
    assert hist["density"].tolist() == hist_straight["density"].tolist()
    ref = prunable_weights(straight)
    for n, t in prunable_weights(model).items():
        assert torch.equal(t.detach() != 0, ref[n].detach() != 0), n
        torch.testing.assert_close(t.detach(), ref[n].detach(), rtol=1e-5, atol=1e-6)
