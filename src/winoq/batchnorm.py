"""BatchNorm folding: every conv followed directly by an eval-mode BatchNorm2d absorbs it,
as every deployment does (the quantized conv then quantizes the weights that run).

For ``y = BN(conv(x))`` with running statistics ``mu``, ``var``, affine ``gamma``,
``beta`` and ``sigma = sqrt(var + eps)``::

    W' = W * gamma / sigma            (per output channel)
    b' = (b - mu) * gamma / sigma + beta

computed in float64 and cast back to the conv's dtype; the BatchNorm becomes ``nn.Identity``.

Pairs are found with ``torch.fx`` when the model traces (a conv node whose only user is a
BatchNorm2d node). When it does not trace, two module-order patterns are folded instead, with
a warning that names them: consecutive ``Conv2d``, ``BatchNorm2d`` children of an
``nn.Sequential``, and ``convN`` / ``bnN`` siblings inside the project's ResNet blocks
(``winoq.models``), whose ``forward`` applies ``bnN`` right after ``convN``.
"""
from __future__ import annotations

import warnings

import torch
from torch import nn

__all__ = ["find_conv_bn_pairs", "fold_batchnorm", "fold_conv_bn"]


def _foldable(conv: nn.Module, bn: nn.Module) -> bool:
    return (type(conv) is nn.Conv2d and type(bn) is nn.BatchNorm2d and not bn.training
            and bn.running_mean is not None and bn.num_features == conv.out_channels)


def _fx_pairs(model: nn.Module) -> list[tuple[str, str]] | None:
    """(conv name, bn name) from the traced graph; None when the model does not trace."""
    import torch.fx

    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception:  # noqa: BLE001 - any tracing failure means: use the module-order fallback
        return None
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or len(node.args) != 1 or not isinstance(node.args[0], torch.fx.Node):
            continue
        src = node.args[0]
        if src.op != "call_module" or len(src.users) != 1:
            continue  # the conv output is also used elsewhere: folding would change that use
        if calls[src.target] != 1 or calls[node.target] != 1:
            continue  # a module called twice cannot be rewritten for one of its uses
        if _foldable(model.get_submodule(src.target), model.get_submodule(node.target)):
            pairs.append((src.target, node.target))
    return pairs


def _project_blocks() -> tuple[type, ...]:
    from .models import BasicBlock, Bottleneck, CifarBasicBlock, CifarResNet, FmnistResNet, ResNet

    return (BasicBlock, Bottleneck, CifarBasicBlock, CifarResNet, FmnistResNet, ResNet)


def _module_order_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """Pairs by structure: Sequential neighbours, and convN/bnN of the project's ResNets."""
    blocks = _project_blocks()
    pairs = []
    for name, mod in model.named_modules():
        prefix = f"{name}." if name else ""
        children = list(mod.named_children())
        if isinstance(mod, nn.Sequential):
            for (cn, c), (bn_name, b) in zip(children, children[1:]):
                if _foldable(c, b):
                    pairs.append((prefix + cn, prefix + bn_name))
        if isinstance(mod, blocks):
            named = dict(children)
            for cn, c in children:
                if cn.startswith("conv") and cn[4:].isdigit() and _foldable(c, named.get("bn" + cn[4:])):
                    pairs.append((prefix + cn, prefix + "bn" + cn[4:]))
    return pairs


def find_conv_bn_pairs(model: nn.Module) -> tuple[list[tuple[str, str]], str]:
    """``(pairs, how)``: the (conv, BatchNorm) module names to fold and how they were found
    ("fx" or "module order"). BatchNorms in training mode are never paired."""
    pairs = _fx_pairs(model)
    if pairs is not None:
        return pairs, "fx"
    return _module_order_pairs(model), "module order"


@torch.no_grad()
def fold_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    """Fold ``bn`` into ``conv`` in place (float64 arithmetic, the conv keeps its dtype)."""
    w = conv.weight.double()
    inv_sigma = (bn.running_var.double() + bn.eps).rsqrt()
    gamma = bn.weight.double() if bn.weight is not None else torch.ones_like(inv_sigma)
    beta = bn.bias.double() if bn.bias is not None else torch.zeros_like(inv_sigma)
    mult = gamma * inv_sigma
    b = conv.bias.double() if conv.bias is not None else torch.zeros_like(inv_sigma)
    conv.weight.copy_((w * mult.view(-1, 1, 1, 1)).to(conv.weight.dtype))
    new_bias = ((b - bn.running_mean.double()) * mult + beta).to(device=conv.weight.device, dtype=conv.weight.dtype)
    if conv.bias is None:
        conv.bias = nn.Parameter(new_bias, requires_grad=conv.weight.requires_grad)
    else:
        conv.bias.copy_(new_bias)


def fold_batchnorm(model: nn.Module) -> list[tuple[str, str]]:
    """Fold every eval-mode BatchNorm2d that directly follows a Conv2d into it, in place;
    each folded BatchNorm becomes ``nn.Identity``. Returns the folded (conv, bn) names.
    A model without such pairs is left untouched."""
    pairs, how = find_conv_bn_pairs(model)
    if pairs and how != "fx":
        warnings.warn(f"the model does not trace with torch.fx: folded {len(pairs)} BatchNorms found by module "
                      f"order (Sequential neighbours, convN/bnN of winoq.models ResNets), e.g. "
                      f"{pairs[0][1]} into {pairs[0][0]}; pass Recipe(fold_batchnorm=False) to keep them",
                      stacklevel=2)
    for conv_name, bn_name in pairs:
        fold_conv_bn(model.get_submodule(conv_name), model.get_submodule(bn_name))
        parent_name, _, child = bn_name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, nn.Identity())
    return pairs
