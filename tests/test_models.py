"""Tests for the model registry and the architectures in elastictrain.models.

Exact parameter counts are the published ones (ElasticTrain's VGG16, CUP's ResNet-56 and MLP,
torchvision's ImageNet ResNets). The big ImageNet ResNets are built on the ``meta`` device, so no
memory is allocated and no initialisation runs: only shapes and names are compared.
"""
import pytest
import torch
import torch.nn as nn
import torchvision

from elastictrain.metrics import count_weights
from elastictrain.models import Normalize, create_model, list_models
from elastictrain.models.common import CIFAR10_MEAN, CIFAR10_STD, IMAGENET_MEAN, IMAGENET_STD

VGG16_CONV_IDX = [0, 3, 7, 10, 14, 17, 20, 24, 27, 30, 34, 37, 40]
VGG16_LAYER_WEIGHTS = [1728, 36864, 73728, 147456, 294912, 589824, 589824, 1179648] + [2359296] * 5 + [5120]
VGG16_WIDTHS = [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]


def n_params(model):
    return sum(p.numel() for p in model.parameters())


@pytest.fixture(scope="module")
def vgg16():
    torch.manual_seed(0)
    return create_model("vgg16")


# ----------------------------------------------------------------------------------------- registry

def test_list_models_holds_every_architecture():
    assert list_models() == sorted(["mlp", "resnet18", "resnet34", "resnet50", "resnet56",
                                    "vgg16", "vgg16_cup"])


def test_unknown_model_raises_value_error_listing_known_names():
    with pytest.raises(ValueError) as exc:
        create_model("vgg17")
    msg = str(exc.value)
    assert "'vgg17'" in msg
    for name in list_models():
        assert name in msg


def test_arch_records_name_and_kwargs():
    m = create_model("mlp", hidden=(64, 32), num_classes=7)
    assert m.arch == {"name": "mlp", "kwargs": {"hidden": (64, 32), "num_classes": 7}}
    assert m.fc3.out_features == 7
    assert create_model("resnet56").arch == {"name": "resnet56", "kwargs": {}}


# -------------------------------------------------------------------------------------------- VGG16

def test_vgg16_weight_and_param_counts(vgg16):
    total, nonzero = count_weights(vgg16)
    assert total == 14_715_584
    assert total - 100 < nonzero <= total  # dense at init (a float32 uniform draw is rarely exactly 0)
    assert n_params(vgg16) == 14_728_266


def test_vgg16_per_layer_weight_table(vgg16):
    named = [(n, m) for n, m in vgg16.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    names = [f"{n}.weight" for n, _ in named]
    assert names == [f"features.{i}.weight" for i in VGG16_CONV_IDX] + ["classifier.weight"]
    assert [m.weight.numel() for _, m in named] == VGG16_LAYER_WEIGHTS
    assert sum(VGG16_LAYER_WEIGHTS) == 14_715_584
    assert [vgg16.features[i].out_channels for i in VGG16_CONV_IDX] == VGG16_WIDTHS
    assert tuple(vgg16.classifier.weight.shape) == (10, 512)


def test_vgg16_elastictrain_init(vgg16):
    bns = [m for m in vgg16.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == 13
    for bn in bns:
        assert torch.all(bn.weight == 0.5)
        assert torch.all(bn.bias == 0)
    for i in VGG16_CONV_IDX:
        assert torch.all(vgg16.features[i].bias == 0)
    # xavier_uniform(gain 0.5): bound = 0.5 * sqrt(6 / (fan_in + fan_out)); first conv: 27 + 576
    w0 = vgg16.features[0].weight.detach()
    bound = 0.5 * (6 / (27 + 576)) ** 0.5
    assert float(w0.abs().max()) <= bound
    assert float(w0.abs().max()) > 0.9 * bound
    w = vgg16.classifier.weight.detach()
    assert float(w.std()) == pytest.approx(0.01, rel=0.1)
    assert abs(float(w.mean())) < 1e-3
    assert torch.all(vgg16.classifier.bias == 0)


def test_vgg16_cup_init():
    torch.manual_seed(0)
    m = create_model("vgg16_cup")
    bns = [b for b in m.modules() if isinstance(b, nn.BatchNorm2d)]
    assert len(bns) == 13 and all(torch.all(b.weight == 1.0) for b in bns)
    # CUP conv init: N(0, sqrt(2 / (9 * C_out))); features.40 has 512*512*9 draws
    w = m.features[40].weight.detach()
    assert float(w.std()) == pytest.approx((2 / (9 * 512)) ** 0.5, rel=0.02)
    assert torch.equal(m.normalize.mean.flatten(), torch.tensor(IMAGENET_MEAN))
    assert n_params(m) == 14_728_266


def test_vgg16_bad_init_raises():
    with pytest.raises(ValueError, match="init must be"):
        create_model("vgg16", init="he")


def test_vgg16_forward_shape(vgg16):
    vgg16.eval()
    with torch.no_grad():
        out = vgg16(torch.rand(2, 3, 32, 32))
    assert out.shape == (2, 10)
    assert out.dtype == torch.float32


def test_vgg16_pruned_widths():
    widths = [8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20]
    m = create_model("vgg16", widths=widths)
    convs = [m.features[i] for i in VGG16_CONV_IDX]
    assert [c.out_channels for c in convs] == widths
    assert [c.in_channels for c in convs] == [3] + widths[:-1]
    assert [m.features[i + 1].num_features for i in VGG16_CONV_IDX] == widths
    assert m.classifier.in_features == 20
    assert m.arch == {"name": "vgg16", "kwargs": {"widths": widths}}
    expected = sum(9 * a * b for a, b in zip([3] + widths[:-1], widths)) + 20 * 10
    assert count_weights(m)[0] == expected
    with torch.no_grad():
        assert m.eval()(torch.rand(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize("n", [12, 14])
def test_vgg16_wrong_widths_length_raises_value_error(n):
    with pytest.raises(ValueError, match="13 convs"):
        create_model("vgg16", widths=[16] * n)


# ---------------------------------------------------------------------------------------- ResNet-56

def test_resnet56_params():
    m = create_model("resnet56")
    assert n_params(m) == 855_770
    blocks = [b for s in (m.layer1, m.layer2, m.layer3) for b in s]
    assert len(blocks) == 27
    # option-B projections only where shapes change: first block of stages 2 and 3
    assert [i for i, b in enumerate(blocks) if b.downsample is not None] == [9, 18]
    assert torch.equal(m.normalize.std.flatten(), torch.tensor(IMAGENET_STD))


def test_resnet56_pruned_widths():
    m = create_model("resnet56", widths=[8] * 27)
    blocks = [b for s in (m.layer1, m.layer2, m.layer3) for b in s]
    assert [b.conv1.out_channels for b in blocks] == [8] * 27
    assert [b.conv2.in_channels for b in blocks] == [8] * 27
    assert [b.bn1.num_features for b in blocks] == [8] * 27
    assert [b.conv2.out_channels for b in blocks] == [16] * 9 + [32] * 9 + [64] * 9
    with torch.no_grad():
        out = m.eval()(torch.rand(2, 3, 32, 32))
    assert out.shape == (2, 10)


def test_resnet56_mixed_widths():
    widths = list(range(1, 28))
    m = create_model("resnet56", widths=widths)
    blocks = [b for s in (m.layer1, m.layer2, m.layer3) for b in s]
    assert [b.conv1.out_channels for b in blocks] == widths


@pytest.mark.parametrize("name,n", [("resnet56", 26), ("resnet56", 28), ("resnet18", 7),
                                    ("resnet34", 17), ("resnet50", 15)])
def test_resnet_wrong_widths_length_raises(name, n):
    w = [(4, 4)] * n if name == "resnet50" else [4] * n
    with pytest.raises(ValueError, match=f"widths has {n} entries"):
        with torch.device("meta"):
            create_model(name, widths=w)


# ------------------------------------------------------------------------------------------- MLP

def test_mlp_params_and_forward():
    m = create_model("mlp")
    assert n_params(m) == 545_810
    assert [m.fc1.out_features, m.fc2.out_features, m.fc3.out_features] == [500, 300, 10]
    with torch.no_grad():
        assert m(torch.rand(3, 1, 28, 28)).shape == (3, 10)
    small = create_model("mlp", hidden=(100, 60))
    assert n_params(small) == 784 * 100 + 100 + 100 * 60 + 60 + 60 * 10 + 10


def test_mlp_has_identity_normalisation():
    m = create_model("mlp")
    x = torch.rand(2, 1, 28, 28)
    assert torch.equal(m.normalize(x), x)


# -------------------------------------------------------------------- ImageNet ResNets vs torchvision

@pytest.mark.parametrize("name,params", [("resnet18", 11_689_512), ("resnet34", 21_797_672),
                                         ("resnet50", 25_557_032)])
def test_imagenet_resnets_match_torchvision(name, params):
    with torch.device("meta"):
        ours = create_model(name)
        ref = getattr(torchvision.models, name)(weights=None)
    assert n_params(ours) == n_params(ref) == params
    sd_ours = {k: v.shape for k, v in ours.state_dict().items() if not k.startswith("normalize.")}
    sd_ref = {k: v.shape for k, v in ref.state_dict().items()}
    assert list(sd_ours) == list(sd_ref)
    assert sd_ours == sd_ref
    assert set(ours.state_dict()) - set(sd_ours) == {"normalize.mean", "normalize.std"}


def test_resnet18_forward_shape_on_meta():
    with torch.device("meta"):
        m = create_model("resnet18", num_classes=100)
        out = m(torch.rand(2, 3, 224, 224))
    assert out.shape == (2, 100)


def test_resnet50_pruned_width_pairs():
    widths = ([(16, 24)] * 3 + [(32, 40)] * 4 + [(64, 72)] * 6 + [(128, 136)] * 3)
    with torch.device("meta"):
        m = create_model("resnet50", widths=widths)
        out = m(torch.rand(2, 3, 224, 224))
    assert out.shape == (2, 1000)
    blocks = [b for s in (m.layer1, m.layer2, m.layer3, m.layer4) for b in s]
    assert len(blocks) == 16
    assert [(b.conv1.out_channels, b.conv2.out_channels) for b in blocks] == widths
    assert [b.conv2.in_channels for b in blocks] == [w1 for w1, _ in widths]
    assert [b.conv3.in_channels for b in blocks] == [w2 for _, w2 in widths]
    assert [b.conv3.out_channels for b in blocks] == [256] * 3 + [512] * 4 + [1024] * 6 + [2048] * 3
    assert [b.conv2.stride for b in blocks][::1] == [(1, 1)] * 3 + [(2, 2)] + [(1, 1)] * 3 + \
        [(2, 2)] + [(1, 1)] * 5 + [(2, 2)] + [(1, 1)] * 2


# ---------------------------------------------------------------------------------- normalisation

def test_normalize_layer_is_x_minus_mean_over_std():
    norm = Normalize(CIFAR10_MEAN, CIFAR10_STD)
    torch.manual_seed(1)
    x = torch.rand(4, 3, 5, 5)
    out = norm(x)
    expected = torch.stack([(x[:, c] - CIFAR10_MEAN[c]) / CIFAR10_STD[c] for c in range(3)], 1)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    # a constant image equal to the mean maps to exactly 0 in every channel
    mean_img = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1).expand(1, 3, 2, 2)
    assert torch.allclose(norm(mean_img), torch.zeros(1, 3, 2, 2), atol=1e-7)
    assert list(norm.state_dict()) == ["mean", "std"]


def test_vgg16_first_layer_is_cifar_normalize(vgg16):
    assert isinstance(vgg16.normalize, Normalize)
    torch.testing.assert_close(vgg16.normalize.mean.flatten(), torch.tensor(CIFAR10_MEAN))
    torch.testing.assert_close(vgg16.normalize.std.flatten(), torch.tensor(CIFAR10_STD))
    x = torch.rand(2, 3, 32, 32)
    ref = (x - torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)) / torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(vgg16.normalize(x), ref)
    # the model's forward is its features applied to the normalised input
    vgg16.eval()
    with torch.no_grad():
        torch.testing.assert_close(vgg16(x), vgg16.classifier(vgg16.features(ref).flatten(1)))
