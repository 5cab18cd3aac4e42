"""ResNets: CUP's CIFAR ResNet-56 and torchvision-compatible ImageNet ResNet-18/34/50.

Parameter names follow torchvision (``layerS.B.conv1``, ``downsample.0``), so CUP's prunable layers
(cup.md §1.9) are found by name. Each block takes its inner width(s) explicitly: CUP shrinks
``conv1`` (and ``conv2`` in a Bottleneck) and everything on the residual path keeps its width,
so shapes at every addition always match.
"""
import torch.nn as nn

from . import register_model
from .common import CIFAR10_MEAN, CIFAR10_STD, IMAGENET_MEAN, IMAGENET_STD, Normalize


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, c_in, width, c_out, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, width, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)  # one module called twice, as in torchvision (FLOPs count both)
        self.downsample = _projection(c_in, c_out, stride)

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, c_in, width, c_out, stride=1):
        super().__init__()
        w1, w2 = width
        self.conv1 = nn.Conv2d(c_in, w1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(w1)
        self.conv2 = nn.Conv2d(w1, w2, 3, stride, 1, bias=False)  # stride on the 3x3, torchvision v1.5
        self.bn2 = nn.BatchNorm2d(w2)
        self.conv3 = nn.Conv2d(w2, c_out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _projection(c_in, c_out, stride)

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + identity)


def _projection(c_in, c_out, stride):
    if stride == 1 and c_in == c_out:
        return None
    return nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))


class ResNet(nn.Module):
    """``stages``: list of (planes, n_blocks, stride); ``widths``: one entry per block (an int for a
    BasicBlock, a pair for a Bottleneck), defaulting to the unpruned ``planes``."""

    def __init__(self, block, stages, widths=None, num_classes=10, imagenet_stem=False,
                 mean=CIFAR10_MEAN, std=CIFAR10_STD):
        super().__init__()
        self.normalize = Normalize(mean, std)
        c = stages[0][0]
        if imagenet_stem:
            self.conv1 = nn.Conv2d(3, c, 7, 2, 3, bias=False)
            self.maxpool = nn.MaxPool2d(3, 2, 1)
            self.avgpool = nn.AdaptiveAvgPool2d(1)
        else:
            self.conv1 = nn.Conv2d(3, c, 3, 1, 1, bias=False)
            self.maxpool = nn.Identity()
            self.avgpool = nn.AvgPool2d(8)  # CUP's CIFAR net: counted as 64 FLOPs per output
        self.bn1 = nn.BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=True)
        n_total = sum(n for _, n, _ in stages)
        if widths is None:
            widths = [planes if block is BasicBlock else (planes, planes)
                      for planes, n, _ in stages for _ in range(n)]
        if len(widths) != n_total:
            raise ValueError(f"widths has {len(widths)} entries, the network has {n_total} blocks")
        it = iter(widths)
        for s, (planes, n, stride) in enumerate(stages, start=1):
            blocks = []
            for b in range(n):
                w = next(it)
                blocks.append(block(c, tuple(w) if block is Bottleneck else int(w),
                                    planes * block.expansion, stride if b == 0 else 1))
                c = planes * block.expansion
            setattr(self, f"layer{s}", nn.Sequential(*blocks))
        self.num_stages = len(stages)
        self.fc = nn.Linear(c, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(self.normalize(x)))))
        for s in range(1, self.num_stages + 1):
            x = getattr(self, f"layer{s}")(x)
        return self.fc(self.avgpool(x).flatten(1))


@register_model
def resnet56(widths=None, num_classes=10):
    """CUP's ResNet-56: 3 × 9 BasicBlocks, 1×1-conv projection shortcuts (option B), 855,770 params."""
    return ResNet(BasicBlock, [(16, 9, 1), (32, 9, 2), (64, 9, 2)], widths, num_classes,
                  mean=IMAGENET_MEAN, std=IMAGENET_STD)


@register_model
def resnet18(widths=None, num_classes=1000):
    return ResNet(BasicBlock, [(64, 2, 1), (128, 2, 2), (256, 2, 2), (512, 2, 2)], widths,
                  num_classes, imagenet_stem=True, mean=IMAGENET_MEAN, std=IMAGENET_STD)


@register_model
def resnet34(widths=None, num_classes=1000):
    return ResNet(BasicBlock, [(64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)], widths,
                  num_classes, imagenet_stem=True, mean=IMAGENET_MEAN, std=IMAGENET_STD)


@register_model
def resnet50(widths=None, num_classes=1000):
    return ResNet(Bottleneck, [(64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)], widths,
                  num_classes, imagenet_stem=True, mean=IMAGENET_MEAN, std=IMAGENET_STD)
