"""FLOPs / params counter: CUP's published baselines and independent hand counts for pruned nets."""
import pytest
import torch
import torch.nn as nn

from elastictrain.flops import count_flops, count_params, flops_reduction, flops_table
from elastictrain.models import create_model

VGG_DEFAULT = [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]


# ---------------------------------------------------------------- hand counts, written independently


def vgg16_hand(widths, num_classes=10):
    """13 × (conv3x3+bias, BN, ReLU), max-pool after convs 2, 4, 7, 10, 13, AvgPool(1), Linear."""
    spatial = [32, 32, 16, 16, 8, 8, 8, 4, 4, 4, 2, 2, 2]
    pool_after = {1, 3, 6, 9, 12}
    total, c_in = 0, 3
    for i, (w, s) in enumerate(zip(widths, spatial)):
        total += (2 * 9 * c_in + 1) * w * s * s  # conv with bias
        total += 2 * w * s * s  # BN
        total += w * s * s  # ReLU
        if i in pool_after:
            total += 4 * w * (s // 2) ** 2  # MaxPool 2x2: 4 per output element
        c_in = w
    total += 1 * c_in  # AvgPool2d(1) on 1x1 maps: kernel 1, one output per channel
    total += 2 * c_in * num_classes + num_classes  # Linear
    return total


def resnet56_hand(widths, num_classes=10):
    total = 2 * 9 * 3 * 16 * 32 * 32 + 2 * 16 * 32 * 32 + 16 * 32 * 32  # stem conv, BN, ReLU
    c_in, r, it = 16, 32, iter(widths)
    for planes, stride in [(16, 1), (32, 2), (64, 2)]:
        for b in range(9):
            s = stride if b == 0 else 1
            r_out = r // s
            w = next(it)
            hw = r_out * r_out
            total += 2 * 9 * c_in * w * hw + 2 * w * hw + w * hw  # conv1, bn1, relu
            total += 2 * 9 * w * planes * hw + 2 * planes * hw + planes * hw  # conv2, bn2, relu
            if s != 1 or c_in != planes:
                total += 2 * c_in * planes * hw + 2 * planes * hw  # 1x1 projection + BN
            c_in, r = planes, r_out
    total += 64 * 64  # AvgPool(8): 64 per output, 64 outputs
    total += 2 * 64 * num_classes + num_classes
    return total


def resnet50_hand(widths, num_classes=1000):
    total = 2 * 49 * 3 * 64 * 112 * 112 + 3 * 64 * 112 * 112  # stem conv 7x7/2, BN + ReLU
    total += 9 * 64 * 56 * 56  # MaxPool 3x3/2
    c_in, r, it = 64, 56, iter(widths)
    for planes, n, stride in [(64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)]:
        c_out = 4 * planes
        for b in range(n):
            s = stride if b == 0 else 1
            r_out = r // s
            w1, w2 = next(it)
            total += (2 * c_in * w1 + 3 * w1) * r * r  # conv1 1x1 at input size, bn1, relu
            total += (2 * 9 * w1 * w2 + 3 * w2) * r_out * r_out  # conv2 3x3 (strided), bn2, relu
            total += (2 * w2 * c_out + 3 * c_out) * r_out * r_out  # conv3 1x1, bn3, relu
            if b == 0:
                total += (2 * c_in * c_out + 2 * c_out) * r_out * r_out  # projection + BN
            c_in, r = c_out, r_out
    total += 49 * 2048  # final pool, counted as torchvision 0.2.0's AvgPool2d(7)
    total += 2 * 2048 * num_classes + num_classes
    return total


def resnet_basic_imagenet_hand(blocks, widths, num_classes=1000):
    """torchvision ResNet-18/34 at 224: stem conv 7x7/2 + BN + ReLU, MaxPool 3x3/2, BasicBlocks
    (conv1 3x3, strided, with the prunable width; conv2 3x3 back to the stage width; a ReLU after
    each), a 1x1 projection + BN where the shape changes, the 7x7 pool and the FC."""
    total = 2 * 49 * 3 * 64 * 112 * 112 + 3 * 64 * 112 * 112 + 9 * 64 * 56 * 56
    c_in, r, it = 64, 56, iter(widths)
    for planes, n, stride in zip((64, 128, 256, 512), blocks, (1, 2, 2, 2)):
        for b in range(n):
            s = stride if b == 0 else 1
            r_out = r // s
            w, hw = next(it), r_out * r_out
            total += (2 * 9 * c_in * w + 3 * w) * hw  # conv1, bn1, relu
            total += (2 * 9 * w * planes + 3 * planes) * hw  # conv2, bn2, relu after the addition
            if s != 1 or c_in != planes:
                total += (2 * c_in * planes + 2 * planes) * hw  # projection + BN
            c_in, r = planes, r_out
    return total + 49 * 512 + 2 * 512 * num_classes + num_classes


# ---------------------------------------------------------------- published baselines


@pytest.mark.parametrize("name, flops, params", [
    ("vgg16", 627_634_698, 14_728_266),
    ("vgg16_cup", 627_634_698, 14_728_266),
    ("resnet56", 253_121_802, 855_770),
    ("mlp", 1_091_610, 545_810),
    ("resnet18", 3_637_254_632, 11_689_512),
    ("resnet34", 7_340_393_960, 21_797_672),
    ("resnet50", 8_212_112_872, 25_557_032),
])
def test_published_baselines(name, flops, params):
    model = create_model(name)
    assert count_flops(model) == flops
    assert count_params(model) == params


def test_hand_counts_reproduce_baselines():
    # Guards the hand formulas themselves, so the pruned comparisons below mean something.
    assert vgg16_hand(VGG_DEFAULT) == 627_634_698
    assert resnet56_hand([16] * 9 + [32] * 9 + [64] * 9) == 253_121_802
    assert resnet50_hand([(p, p) for p, n in [(64, 3), (128, 4), (256, 6), (512, 3)]
                          for _ in range(n)]) == 8_212_112_872



def test_imagenet_basic_hand_counts_reproduce_baselines():
    # The published ResNet-18/34 figures (cup.md §1.10) from the hand formula, independently of the hooks.
    assert resnet_basic_imagenet_hand((2, 2, 2, 2), [64] * 2 + [128] * 2 + [256] * 2 + [512] * 2) == 3_637_254_632
    assert resnet_basic_imagenet_hand((3, 4, 6, 3), [64] * 3 + [128] * 4 + [256] * 6 + [512] * 3) == 7_340_393_960


# ---------------------------------------------------------------- pruned models


def test_pruned_vgg16_hand_count():
    widths = [32, 64, 64, 128, 100, 256, 256, 300, 200, 512, 100, 50, 64]
    assert count_flops(create_model("vgg16", widths=widths)) == vgg16_hand(widths)


def test_pruned_resnet56_hand_count():
    widths = [8] * 27
    assert count_flops(create_model("resnet56", widths=widths)) == resnet56_hand(widths)


def test_pruned_resnet50_hand_count():
    widths = [(32, 32)] * 16
    assert count_flops(create_model("resnet50", widths=widths)) == resnet50_hand(widths)


@pytest.mark.parametrize("name, blocks, widths", [
    ("resnet18", (2, 2, 2, 2), [7, 64, 1, 100, 256, 3, 512, 20]),
    ("resnet34", (3, 4, 6, 3), [5, 64, 33, 1, 128, 90, 2, 256, 17, 200, 3, 256, 40, 100, 512, 1]),
])
def test_pruned_resnet18_34_hand_count(name, blocks, widths):
    model = create_model(name, widths=widths)
    assert count_flops(model) == resnet_basic_imagenet_hand(blocks, widths)
    # FLOPs of a 4-class head differ from the 1000-class one in the FC only
    assert count_flops(model) - count_flops(create_model(name, widths=widths, num_classes=4)) == 2 * 512 * 996 + 996


def test_pruned_mlp():
    model = create_model("mlp", hidden=(100, 50))
    relu = 100 + 50
    linear = (2 * 784 * 100 + 100) + (2 * 100 * 50 + 50) + (2 * 50 * 10 + 10)
    assert count_flops(model) == linear + relu
    assert count_params(model) == 784 * 100 + 100 + 100 * 50 + 50 + 50 * 10 + 10


# ---------------------------------------------------------------- nonzero_only


def _make_dense(model):
    # float32 uniform init can land on an exact 0 (p = 2**-24 per weight), so force density.
    with torch.no_grad():
        for p in model.parameters():
            p[p == 0] = 1e-3
    return model


def test_nonzero_only_conv():
    model = _make_dense(create_model("vgg16"))
    dense = count_flops(model)
    assert count_flops(model, nonzero_only=True) == dense  # fully dense: both modes agree
    w = model.features[0].weight  # 64 x 3 x 3 x 3 at 32 x 32
    with torch.no_grad():
        w.view(-1)[: w.numel() // 2] = 0
    assert count_flops(model) == dense  # the CUP counter is dense
    assert dense - count_flops(model, nonzero_only=True) == 2 * (w.numel() // 2) * 32 * 32


def test_nonzero_only_linear():
    model = _make_dense(create_model("mlp"))
    assert count_flops(model, nonzero_only=True) == count_flops(model)
    with torch.no_grad():
        model.fc1.weight[:250] = 0  # half of the 500 x 784 weights
    assert count_flops(model) - count_flops(model, nonzero_only=True) == 2 * 250 * 784


# ---------------------------------------------------------------- table, modes, hooks, misc


def test_flops_table_sums_to_count():
    model = create_model("resnet56")
    table = flops_table(model)
    assert list(table.columns) == ["module", "type", "output_shape", "flops"]
    assert table["flops"].sum() == count_flops(model)
    assert "normalize" not in set(table["module"])
    # One ReLU module per BasicBlock, called twice: two rows.
    assert (table["module"] == "layer1.0.relu").sum() == 2
    assert table.loc[table["module"] == "fc", "output_shape"].item() == "(1, 10)"


def test_modes_restored_and_hooks_removed():
    model = create_model("resnet56")
    model.train()
    model.layer1[0].bn1.eval()  # a deliberately mixed state must survive
    running_mean = model.bn1.running_mean.clone()
    count_flops(model)
    flops_table(model)
    assert model.training and model.layer2[0].bn2.training
    assert not model.layer1[0].bn1.training
    assert torch.equal(model.bn1.running_mean, running_mean)  # ran in eval mode
    assert all(not m._forward_hooks for m in model.modules())

    model.eval()
    count_flops(model)
    assert not any(m.training for m in model.modules())


def test_hooks_removed_when_forward_raises():
    model = create_model("vgg16").train()
    with pytest.raises(RuntimeError):
        count_flops(model, input_size=(1, 5, 32, 32))  # wrong channel count
    assert all(not m._forward_hooks for m in model.modules())
    assert all(m.training for m in model.modules())


def test_input_size_inference():
    model = create_model("resnet18", widths=[8] * 8, num_classes=10)
    assert count_flops(model) == count_flops(model, input_size=(1, 3, 224, 224))
    mlp = create_model("mlp")
    assert count_flops(mlp) == count_flops(mlp, input_size=(1, 1, 28, 28))
    plain = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False))  # no .arch: CIFAR size
    assert count_flops(plain) == 2 * 9 * 3 * 4 * 32 * 32


def test_pool_kernel_tuple_and_int():
    model = nn.Sequential(nn.MaxPool2d((2, 2)), nn.AvgPool2d(2))
    # 3 x 8 x 8 -> 3 x 4 x 4 (4 per output) -> 3 x 2 x 2 (4 per output)
    assert count_flops(model, input_size=(1, 3, 8, 8)) == 4 * 48 + 4 * 12


def test_follows_model_dtype():
    model = create_model("resnet56", widths=[8] * 27).double()
    assert count_flops(model) == resnet56_hand([8] * 27)


def test_count_params_trainable_only():
    model = create_model("mlp")
    model.fc3.weight.requires_grad_(False)
    assert count_params(model) == 545_810 - 300 * 10


def test_flops_reduction():
    assert flops_reduction(627_634_698, 627_634_698 / 2) == pytest.approx(2.0)
    assert flops_reduction(8.21, 3.33) == pytest.approx(8.21 / 3.33)
