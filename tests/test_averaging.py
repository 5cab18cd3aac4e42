"""Tests for elastictrain.averaging.WeightAverage: the exact moving average, loaded at the end of
``fit``; masks intact when it starts after the pruning ramp, a refusal when it starts before; an
interrupted run resumes to the same average. A small MLP on random MNIST-shaped images, on the CPU."""
import dataclasses

import pytest
import torch

from test_prune import StopAt, small_mlp, tiny_split

from elastictrain.averaging import WeightAverage
from elastictrain.data import GpuLoader
from elastictrain.metrics import count_weights
from elastictrain.models.common import prunable_weights
from elastictrain.prune import MaskCallback, PruneSpec
from elastictrain.train import Callback, TrainConfig, fit


@pytest.fixture(autouse=True)
def private_checkpoints_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("ELASTICTRAIN_CHECKPOINTS", str(tmp_path / "ckpts"))


SPLIT = tiny_split(256)
CFG = TrainConfig(epochs=3, lr=0.05, checkpoint_every=1, eval_every=0)


def _fit(*callbacks, path=None, seed=0, cfg=CFG):
    return fit(small_mlp(seed), GpuLoader(SPLIT, 64, train=True, seed=1), None, cfg, callbacks=list(callbacks),
               device="cpu", checkpoint_path=path, progress=False)


class Snapshots(Callback):
    """Every floating tensor of the model after every step from ``start`` on (what the average sees)."""

    def __init__(self, start):
        self.start, self.steps, self.last = start, [], None

    def after_step(self, state):
        live = {k: v.detach().clone() for k, v in state.model.state_dict().items() if v.dtype.is_floating_point}
        self.last = live
        if state.epoch >= self.start:
            self.steps.append(live)


def test_the_final_model_is_the_exact_moving_average():
    snaps = Snapshots(start=1)
    model, _ = _fit(snaps, WeightAverage(0.9, start_epoch=1))
    assert len(snaps.steps) == 2 * 4                            # epochs 1 and 2, 256 / 64 steps each
    expected = {k: v.clone() for k, v in snaps.steps[0].items()}
    for live in snaps.steps[1:]:
        for k in expected:
            expected[k] = 0.9 * expected[k] + 0.1 * live[k]
    final = model.state_dict()
    for k, v in expected.items():
        torch.testing.assert_close(final[k], v, rtol=1e-5, atol=1e-7)
    for k, _ in model.named_parameters():
        assert not torch.equal(final[k], snaps.last[k]), k      # not the last step's weights
    assert final["fc1.weight"].abs().sum() > 0


@pytest.fixture(scope="module")
def averaged_pruned_run():
    masks = MaskCallback(PruneSpec(), 0.1, ramp_epochs=2)
    avg = WeightAverage(0.8, start_epoch=2)
    model, _ = _fit(masks, avg, cfg=dataclasses.replace(CFG, epochs=4))
    return masks, avg, model


def test_average_after_the_ramp_keeps_the_final_masks(averaged_pruned_run):
    masks, avg, model = averaged_pruned_run
    assert avg.steps == 2 * 4
    total, nonzero = count_weights(model)
    assert nonzero == round(0.1 * total)
    for n, w in prunable_weights(model).items():
        assert torch.equal(w.detach() != 0, masks.masks[n].bool()), n


def test_average_across_a_mask_change_is_refused():
    with pytest.raises(ValueError, match="last mask change"):
        _fit(MaskCallback(PruneSpec(), 0.1, ramp_epochs=2), WeightAverage(0.8, start_epoch=0))


@pytest.mark.parametrize("decay, start", [(0.0, 0), (1.0, 0), (0.9, -1)])
def test_bad_settings_are_refused(decay, start):
    with pytest.raises(ValueError, match="decay"):
        WeightAverage(decay, start)


def test_training_that_ends_before_the_average_starts_is_refused():
    with pytest.raises(ValueError, match="start_epoch=5"):
        _fit(WeightAverage(0.9, start_epoch=5))


def test_resume_gives_the_uninterrupted_average(averaged_pruned_run, tmp_path):
    _, _, straight = averaged_pruned_run
    cfg = dataclasses.replace(CFG, epochs=4)
    path = tmp_path / "run.pt"
    with pytest.raises(KeyboardInterrupt):   # the saved state holds one epoch of average
        _fit(MaskCallback(PruneSpec(), 0.1, ramp_epochs=2), WeightAverage(0.8, start_epoch=2), StopAt(3),
             path=path, cfg=cfg)
    avg = WeightAverage(0.8, start_epoch=2)
    model, _ = _fit(MaskCallback(PruneSpec(), 0.1, ramp_epochs=2), avg, path=path, seed=5, cfg=cfg)
    assert avg.steps == 2 * 4
    ref = straight.state_dict()
    for k, v in model.state_dict().items():
        if v.dtype.is_floating_point:
            torch.testing.assert_close(v, ref[k], rtol=1e-5, atol=1e-6)
