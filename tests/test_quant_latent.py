"""Mode B (quant.latent): latent weights snapped to their group's nearest centroid, gradients straight
through, codebooks re-clustered, then frozen into mode A."""
import numpy as np
import pytest
import torch
from torch.nn.utils import parametrize

from elastictrain.models.common import prunable_weights
from elastictrain.prune.structure import LAYER, WORKLOAD
from elastictrain.quant import QuantSpec, bake_, codebooks, quantize_, unique_per_group
from elastictrain.quant.codebook import SharedWeight
from elastictrain.quant.latent import LatentPhase, SnappedWeight, assignments, freeze_, recluster_, snap_
from test_quant import parametrized_weight_grad, sparse_vgg, tiny_cifar_loader

X = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("spec", [QuantSpec(3, LAYER), QuantSpec(2, WORKLOAD)])
def test_snapped_weights_sit_on_their_nearest_centroid_and_compute_what_mode_a_does(spec):
    m, a = sparse_vgg(density=0.2), sparse_vgg(density=0.2)
    latent = {n: w.detach().clone() for n, w in prunable_weights(m).items()}
    books = snap_(m, spec)
    quantize_(a, spec)
    for n, w in prunable_weights(m).items():
        assert torch.equal(w != 0, latent[n] != 0), n
        assert int(unique_per_group(w, spec.structure).max()) <= spec.levels
    conv = m.features[3]
    snapped = conv.parametrizations.weight[0]
    assert isinstance(snapped, SnappedWeight)
    v = latent["features.3.weight"].flatten()[snapped.positions].numpy()
    book = books["features.3.weight"].numpy()[snapped.groups.numpy()]         # [n, K]
    expected = book[np.arange(len(v)), np.abs(v[:, None] - book).argmin(1)]
    assert np.array_equal(conv.weight.detach().flatten()[snapped.positions].numpy(), expected)
    # right after k-means both modes compute the same function: the clustered accuracy is mode A's
    assert torch.equal(m.eval()(X), a.eval()(X))


def test_gradient_reaches_the_latent_weight_unchanged_and_never_a_pruned_one():
    m = sparse_vgg(density=0.2)
    snap_(m, QuantSpec(2, LAYER))
    conv = m.features[3]
    w = parametrized_weight_grad(m, conv, X)
    latent = conv.parametrizations.weight.original
    pos = conv.parametrizations.weight[0].positions
    assert torch.equal(latent.grad.flatten()[pos], w.grad.flatten()[pos])
    pruned = torch.ones(latent.numel(), dtype=torch.bool)
    pruned[pos] = False
    assert int(pruned.sum()) > 0 and not latent.grad.flatten()[pruned].any()


def test_recluster_moves_each_entry_to_its_members_mean_and_keeps_an_empty_one():
    m = sparse_vgg(density=0.2)
    snap_(m, QuantSpec(2, LAYER))
    conv = m.features[3]
    snapped, latent = conv.parametrizations.weight[0], conv.parametrizations.weight.original
    n = len(snapped.positions)
    centres = torch.tensor([-1.0, 0.5, 1.0])
    which = torch.arange(n) % 3
    values = centres[which] + 0.01 * torch.randn(n, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        latent.view(-1)[snapped.positions] = values
        snapped.codebook.copy_(torch.tensor([[-1.2, 0.3, 1.3, 9.0]]))
    recluster_(m)
    means = torch.stack([values[which == j].mean() for j in range(3)])
    assert torch.allclose(snapped.codebook[0, :3], means, atol=1e-6)
    assert snapped.codebook[0, 3] == 9.0                                       # no members: unchanged
    assert torch.equal(assignments(m)["features.3.weight"], which)


def test_freeze_keeps_the_function_and_leaves_only_codebooks_to_train():
    m = sparse_vgg(density=0.2)
    spec = QuantSpec(2, WORKLOAD)
    start = snap_(m, spec)
    mask = {n: (w != 0).clone() for n, w in prunable_weights(m).items()}
    with torch.no_grad():                 # as if training had moved the latent weights
        for mod in m.modules():
            if parametrize.is_parametrized(mod, "weight"):
                lat = mod.parametrizations.weight.original
                lat.mul_(1 + 0.3 * torch.randn(lat.shape, generator=torch.Generator().manual_seed(1)))
    codes = assignments(m)
    before = m.eval()(X)
    books = freeze_(m)
    assert torch.equal(m(X), before)
    for name, mod in [(n, mod) for n, mod in m.named_modules() if parametrize.is_parametrized(mod, "weight")]:
        shared = mod.parametrizations.weight[0]
        assert isinstance(shared, SharedWeight)
        assert torch.equal(shared.codes, codes[f"{name}.weight"])
        assert mod.parametrizations.weight.original.shape == start[f"{name}.weight"].shape
    assert {n: b.shape for n, b in books.items()} == {n: b.shape for n, b in start.items()}
    bake_(m)
    for n, w in prunable_weights(m).items():
        assert torch.equal(w != 0, mask[n]) and int(unique_per_group(w, spec.structure).max()) <= 4


def test_latent_phase_lets_weights_change_centroid_then_trains_centroids():
    from elastictrain.train import TrainConfig, fit
    m = sparse_vgg()
    mask = {n: (w != 0).clone() for n, w in prunable_weights(m).items()}
    snap_(m, QuantSpec(2, LAYER))
    start = assignments(m)
    phase = LatentPhase(2)
    m, history = fit(m, tiny_cifar_loader(), None, TrainConfig(epochs=3, lr=0.2),
                     callbacks=[phase], progress=False)
    # epoch 2 (the second of mode B) counts the weights whose centroid changed during epoch 1
    assert np.isnan(history.changed_centroid[0]) and 0 < history.changed_centroid[1] < 1
    assert np.isnan(history.changed_centroid[2])                                # mode A from epoch 3
    frozen = {f"{n}.weight": mod.parametrizations.weight[0].codes for n, mod in m.named_modules()
              if parametrize.is_parametrized(mod, "weight")}
    assert all(isinstance(s, SharedWeight) for s in
               (mod.parametrizations.weight[0] for mod in m.modules() if parametrize.is_parametrized(mod, "weight")))
    assert sum(int((frozen[n] != c).sum()) for n, c in start.items()) > 0     # what mode A alone never does
    assert set(codebooks(m)) == set(start)
    bake_(m)
    for n, w in prunable_weights(m).items():
        assert torch.equal(w != 0, mask[n]) and int(unique_per_group(w, LAYER).max()) <= 4


def test_latent_phase_refuses_negative_epochs_and_unknown_gradients():
    with pytest.raises(ValueError, match=">= 0"):
        LatentPhase(-1)
    with pytest.raises(ValueError, match="sum' or 'mean"):
        LatentPhase(2, grad="avg")
