"""VGG16 for CIFAR-10: DNR / ElasticTrain's "VGGNet" (spec elastictrain.md §2.2, cup.md §2.2).

13 × [Conv3x3(bias) → BN → ReLU] with 5 max-pools, a no-op AvgPool(1), one Linear(512→10).
Conv weights live at ``features.{0,3,7,...,40}.weight`` exactly as in ElasticTrain checkpoints;
14,715,584 conv+linear weights. ``widths`` lets CUP rebuild a model with non-uniform layers.
"""
import torch.nn as nn

from . import register_model
from .common import CIFAR10_MEAN, CIFAR10_STD, IMAGENET_MEAN, IMAGENET_STD, Normalize

VGG16_CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]


class VGG(nn.Module):
    def __init__(self, widths, num_classes=10, in_channels=3, mean=CIFAR10_MEAN, std=CIFAR10_STD,
                 init="elastictrain"):
        super().__init__()
        n_convs = sum(v != "M" for v in VGG16_CFG)
        if len(widths) != n_convs:
            raise ValueError(f"widths has {len(widths)} entries, VGG16 has {n_convs} convs")
        self.normalize = Normalize(mean, std)
        layers, c_in, it = [], in_channels, iter(widths)
        for v in VGG16_CFG:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                c_out = next(it)
                layers += [nn.Conv2d(c_in, c_out, 3, padding=1, bias=True), nn.BatchNorm2d(c_out),
                           nn.ReLU(inplace=True)]
                c_in = c_out
        layers.append(nn.AvgPool2d(1, 1))  # a no-op kept so module indices match the original
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(c_in, num_classes)
        _init_weights(self, init)

    def forward(self, x):
        x = self.features(self.normalize(x))
        return self.classifier(x.flatten(1))

    def forward_with_maps(self, x):
        """The logits and the five activation maps that enter the max-pools (32² to 2²): where
        attention transfer (``objectives.attention_transfer``) compares a student with its teacher."""
        maps, x = [], self.normalize(x)
        for m in self.features:
            if isinstance(m, nn.MaxPool2d):
                maps.append(x)
            x = m(x)
        return self.classifier(x.flatten(1)), maps


def _init_weights(model, init):
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            if init == "elastictrain":  # DNR models.py: xavier(gain 0.5), BN gamma 0.5
                nn.init.xavier_uniform_(m.weight, gain=0.5)
            elif init == "cup":  # CUP model.py: N(0, sqrt(2 / (k*k*C_out)))
                nn.init.normal_(m.weight, 0.0, (2.0 / (9 * m.out_channels)) ** 0.5)
            else:
                raise ValueError(f"init must be 'elastictrain' or 'cup', got {init!r}")
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            # CUP left BN at torch 0.4.1's default gamma ~ U(0,1); we use the modern 1 (spec Q15).
            nn.init.constant_(m.weight, 0.5 if init == "elastictrain" else 1.0)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.01)
            nn.init.zeros_(m.bias)


@register_model
def vgg16(widths=None, num_classes=10, init="elastictrain"):
    """ElasticTrain's VGG16, CIFAR-10 normalisation."""
    widths = widths or [v for v in VGG16_CFG if v != "M"]
    return VGG(widths, num_classes, init=init)


@register_model
def vgg16_cup(widths=None, num_classes=10, init="cup"):
    """CUP's VGG16: same layers, CUP init, ImageNet mean/std on CIFAR (spec Q14)."""
    widths = widths or [v for v in VGG16_CFG if v != "M"]
    return VGG(widths, num_classes, mean=IMAGENET_MEAN, std=IMAGENET_STD, init=init)
