"""CUP's MNIST MLP 784-500-300-10 (cup.md §2.2): default Linear init, no input normalisation
(CUP feeds ToTensor() output as is), 545,810 parameters. ``hidden`` lets CUP shrink it."""
import torch.nn as nn

from . import register_model
from .common import Normalize


class MLP(nn.Module):
    def __init__(self, hidden=(500, 300), in_features=784, num_classes=10):
        super().__init__()
        self.normalize = Normalize((0.0,), (1.0,))
        self.fc1 = nn.Linear(in_features, hidden[0])
        self.fc2 = nn.Linear(hidden[0], hidden[1])
        self.fc3 = nn.Linear(hidden[1], num_classes)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        x = self.normalize(x).flatten(1)
        return self.fc3(self.relu(self.fc2(self.relu(self.fc1(x)))))


@register_model
def mlp(hidden=(500, 300), num_classes=10):
    return MLP(tuple(hidden), num_classes=num_classes)
