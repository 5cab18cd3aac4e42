"""The original ElasticTrain checkpoint layout, both ways (spec elastictrain.md §2.1).

ElasticTrain's ``ModelEval.py`` loads ``{'model_state_dict', 'elastic_trainer_state_dict':
{'model_buffers_state_dict': {weight_mask, pre_weight_mask, structured_weight_mask,
pre_structured_weight_mask, quantization_table}}, 'local_dict': {'epoch'}}`` and feeds the model
inputs normalised by its data loader. So an export drops our in-model ``normalize`` layer and an
import puts it back; masks are float tensors shaped like each weight, keyed by parameter name,
and ``quantization_table[name]`` is a [G, K] codebook tensor (empty for unquantized models).
"""
from pathlib import Path

import torch

from .checkpoints import CheckpointError, atomic_write
from .models import create_model
from .models.common import prunable_weights
from .prune.structure import KERNEL, blocks, unblocks

MASKS = ("weight_mask", "pre_weight_mask", "structured_weight_mask", "pre_structured_weight_mask")
_VGG = ("vgg16", "vgg16_cup")


def _kernel_mask(w: torch.Tensor) -> torch.Tensor:
    """The structure-level mask: 1 over every k×k kernel holding a non-zero (per weight for FC)."""
    if w.dim() != 4:
        return (w != 0).float()
    keep = blocks(w, KERNEL).ne(0).any(1, keepdim=True).expand(-1, w.shape[2] * w.shape[3])
    return unblocks(keep.float(), KERNEL, w.shape)


def export_elastictrain(model, path, *, epoch: int = 0, quantization_table: dict | None = None) -> Path:
    """Write ``model`` (an unpruned-width VGG16) in ElasticTrain's layout, atomically."""
    arch = getattr(model, "arch", {})
    if arch.get("name") not in _VGG or arch.get("kwargs", {}).get("widths") is not None:
        raise ValueError(f"ElasticTrain checkpoints hold the full-width VGG16; this model is {arch or type(model).__name__}")
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items() if not k.startswith("normalize.")}
    weights = {n: w.detach().cpu() for n, w in prunable_weights(model).items()}
    element = {n: (w != 0).float() for n, w in weights.items()}
    structured = {n: _kernel_mask(w) for n, w in weights.items()}
    buffers = {"weight_mask": element, "pre_weight_mask": {n: m.clone() for n, m in element.items()},
               "structured_weight_mask": structured,
               "pre_structured_weight_mask": {n: m.clone() for n, m in structured.items()},
               "quantization_table": {n: t.detach().cpu() for n, t in (quantization_table or {}).items()}}
    ckpt = {"model_state_dict": state, "elastic_trainer_state_dict": {"model_buffers_state_dict": buffers},
            "local_dict": {"epoch": int(epoch)}}
    path = Path(path)
    atomic_write(path, lambda f: torch.save(ckpt, f))
    return path


def import_elastictrain(path, *, model_name: str = "vgg16") -> tuple[torch.nn.Module, dict]:
    """Load an ElasticTrain-layout checkpoint into our VGG16 (with our normalisation layer in front,
    matching ElasticTrain's loader). Returns ``(model, model_buffers_state_dict)``."""
    path = Path(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    except Exception as e:
        raise CheckpointError(f"{path}: not loadable as a weights-only checkpoint ({type(e).__name__}: {e}); "
                              "it may be truncated, or pickle custom objects we refuse to run") from e
    if not isinstance(ckpt, dict) or "model_state_dict" not in ckpt:
        raise CheckpointError(f"{path}: not an ElasticTrain checkpoint (no 'model_state_dict'); our own "
                              "checkpoints load with elastictrain.checkpoints.load_checkpoint")
    model = create_model(model_name)
    state = dict(ckpt["model_state_dict"])
    state.update({k: v for k, v in model.state_dict().items() if k.startswith("normalize.")})
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{path}: its model_state_dict does not fit {model_name} ({str(e)[:300]})") from e
    buffers = ckpt.get("elastic_trainer_state_dict", {}).get("model_buffers_state_dict", {})
    for n, w in prunable_weights(model).items():
        mask = buffers.get("weight_mask", {}).get(n)
        if mask is not None and bool((w.detach()[mask == 0] != 0).any()):
            raise CheckpointError(f"{path}: {n} has non-zero weights where its weight_mask is zero; "
                                  "the file is inconsistent")
    return model.eval(), buffers


def modeleval_counts(state_dict: dict) -> tuple[int, int]:
    """(weights, non-zeros) as ModelEval counts them from a state_dict: every 4-D (conv) and 2-D
    (linear) ``.weight``; BN weights (1-D), biases and running statistics are not counted."""
    ws = [v for k, v in state_dict.items() if k.endswith(".weight") and v.dim() in (2, 4)]
    return sum(w.numel() for w in ws), sum(int((w != 0).sum()) for w in ws)
