"""Pieces shared by every model family."""
import torch
import torch.nn as nn

CIFAR10_MEAN = (0.491, 0.482, 0.447)  # ElasticTrain / DNR normalisation (spec §2.3)
CIFAR10_STD = (0.247, 0.243, 0.262)
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # CUP normalises CIFAR with these too (spec quirk Q14)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Normalize(nn.Module):
    """(x - mean) / std as the model's first layer.

    Models take [0, 1] inputs so that adversarial attacks can clamp in pixel space and a shipped
    model is self-contained. Mean and std are buffers, so they travel with the state_dict.
    """

    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x):
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)


def prunable_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The conv and linear ``.weight`` tensors, keyed by parameter name.

    These are what ElasticTrain's ModelEval counts for compression (biases and BN excluded).
    """
    return {f"{name}.weight": m.weight for name, m in model.named_modules()
            if isinstance(m, (nn.Conv2d, nn.Linear))}
