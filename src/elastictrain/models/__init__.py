"""Model registry (timm style): every architecture is built by name, and the name plus its keyword
arguments is stored on the instance as ``model.arch``, so a saved model can be rebuilt from its file
alone (including non-uniform widths left by CUP)."""
from typing import Callable

import torch.nn as nn

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    _REGISTRY[fn.__name__] = fn
    return fn


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def create_model(name: str, **kwargs) -> nn.Module:
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(list_models())}")
    model = _REGISTRY[name](**kwargs)
    model.arch = {"name": name, "kwargs": dict(kwargs)}
    return model


def input_shape(model: nn.Module) -> tuple[int, int, int]:
    """One input image's shape for a registry model: MNIST for the MLP, ImageNet for the torchvision
    ResNets, CIFAR-10 for the rest."""
    name = model.arch["name"]
    return {"mlp": (1, 28, 28), "resnet18": (3, 224, 224), "resnet34": (3, 224, 224),
            "resnet50": (3, 224, 224)}.get(name, (3, 32, 32))


# Imported for their @register_model side effect.
from . import mlp, resnet, vgg  # noqa: E402,F401
from .common import Normalize  # noqa: E402,F401
