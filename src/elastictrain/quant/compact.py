"""Make a finished model's non-weight parameters cheap to store (spec §5.11), in place.

At 1000× the BatchNorm and bias parameters (84.5 KB in fp32 for VGG16) outweigh the compressed
weights several times over. In eval mode a conv → BN pair is an affine map per channel, so:

* ``fold_bn_`` rewrites each pair as conv (bias 0) → BN with running mean 0, running variance
  1 − eps and (weight, bias) = the per-channel (scale, shift). Channels that cannot matter are then
  zeroed: a *dead* filter (all its weights zero) outputs only its shift, so its scale is set to 0; a
  dead filter whose shift is ≤ 0 outputs ReLU(shift) = 0, so its shift is 0 too; a channel that no
  later weight reads (its input column is all zero in the next layer) gets scale and shift 0.
* ``snap_fp16_`` rounds the BN scale/shift and the shared weight values to fp16.

Neither is bit-exact against the model before it (the folded affine map rounds differently, fp16
rounds), so ``quant.recipe`` applies both *before* the final accuracy measurement: the number
reported is that of the snapped model, and ``storage`` then stores it losslessly, picking fp16,
constant or sparse encodings because the values now allow them.
"""
import torch
import torch.nn as nn

from ..models.common import prunable_weights

_FP16_MAX = 65504.0
_FP16_TINY = 2.0 ** -24          # the smallest positive fp16 (subnormal)


def check_foldable(model: nn.Module):
    """Refuse a model ``fold_bn_`` cannot fold soundly. VGG only: there the order of ``model.modules()``
    is the order of execution, every BN is followed by a ReLU and a channel feeds only the next
    conv/linear (a residual net breaks all three). ``quant.recipe`` asks before any training."""
    if not getattr(model, "arch", {}).get("name", "").startswith("vgg"):
        raise NotImplementedError("BN folding with dead-channel analysis is written for VGG (conv → BN → ReLU "
                                  f"stacks), not {getattr(model, 'arch', {}).get('name')!r}: quantize a VGG row's "
                                  "file, or fold BN for this architecture first")


def _chain(model: nn.Module):
    """(conv, bn, next weight layer) for each conv followed by a BN, in execution order."""
    check_foldable(model)
    leaves = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear, nn.BatchNorm2d, nn.BatchNorm1d))]
    weights = [m for m in leaves if isinstance(m, (nn.Conv2d, nn.Linear))]
    out = []
    for i, m in enumerate(leaves[:-1]):
        if isinstance(m, (nn.Conv2d, nn.Linear)) and isinstance(leaves[i + 1], nn.modules.batchnorm._BatchNorm):
            j = weights.index(m)
            out.append((m, leaves[i + 1], weights[j + 1] if j + 1 < len(weights) else None))
    return out


@torch.no_grad()
def fold_bn_(model: nn.Module) -> dict:
    """Fold every conv → BN pair (see the module doc); returns channel counts for the report:
    ``channels``, ``dead`` (all-zero filters), ``unread`` (no later weight reads them), ``stored``
    (scale or shift still non-zero)."""
    counts = {"channels": 0, "dead": 0, "unread": 0, "stored": 0}
    for conv, bn, nxt in _chain(model):
        w = conv.weight.detach()
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        bias = conv.bias if conv.bias is not None else torch.zeros_like(scale)
        shift = bn.bias + scale * (bias - bn.running_mean)
        dead = (w.flatten(1) == 0).all(1)
        scale[dead] = 0.0
        shift[dead & (shift <= 0)] = 0.0  # ReLU(shift) = 0: the channel is all zero (VGG: BN → ReLU)
        unread = torch.zeros_like(dead)
        if nxt is not None and nxt.weight.shape[1] == len(scale):
            unread = (nxt.weight.detach().transpose(0, 1).flatten(1) == 0).all(1)
            scale[unread], shift[unread] = 0.0, 0.0
        if conv.bias is not None:
            conv.bias.zero_()
        bn.running_mean.zero_()
        # var + eps == 1 in fp32, so BN computes (x - 0) / 1 * scale + shift
        bn.running_var.fill_(float(torch.tensor(1.0) - torch.tensor(bn.eps)))
        bn.weight.copy_(scale)
        bn.bias.copy_(shift)
        counts["channels"] += len(scale)
        counts["dead"] += int(dead.sum())
        counts["unread"] += int(unread.sum())
        counts["stored"] += int(((scale != 0) | (shift != 0)).sum())
    return counts


def _to_fp16_grid(t: torch.Tensor, keep_nonzero: bool) -> torch.Tensor:
    """``t`` rounded to the nearest fp16 value; values beyond fp16's range stay as they are (the file
    then keeps that tensor in fp32). With ``keep_nonzero`` a non-zero never rounds to 0: it becomes
    ±2^-24 instead, so a sparsity mask survives."""
    snapped = t.half().float()
    big = t.abs() > _FP16_MAX
    snapped[big] = t[big]
    if keep_nonzero:
        lost = (snapped == 0) & (t != 0)
        snapped[lost] = torch.sign(t[lost]) * _FP16_TINY
    return snapped


@torch.no_grad()
def snap_fp16_(model: nn.Module, weights: bool = True, bn: bool = True) -> nn.Module:
    """Round the conv/linear weights (``weights``; the mask is kept) and the BN affine parameters
    (``bn``) to fp16 values, still held in fp32 tensors."""
    if weights:
        for w in prunable_weights(model).values():
            w.copy_(_to_fp16_grid(w.detach().float(), keep_nonzero=True))
    if bn:
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine:
                m.weight.copy_(_to_fp16_grid(m.weight.detach().float(), keep_nonzero=False))
                m.bias.copy_(_to_fp16_grid(m.bias.detach().float(), keep_nonzero=False))
    return model
