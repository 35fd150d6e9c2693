"""Physical channel removal: turn a channel-pruned network into a genuinely smaller one.

Why a separate step: zeroing whole channels (masks) saves nothing at inference: the dense kernels
still multiply the zeros. Only rebuilding the layers with fewer channels shrinks the parameter
count, the file and the latency. That is safe only for a *plain conv chain* (conv [-> BN] ... ->
linear head), where channel ``c`` of one conv feeds input channel ``c`` of the next layer alone.
Residual sums (ResNet, MobileNetV2) tie the channel counts of several layers together, so those
models keep their zeroed channels instead.

The chain is read from the module registration order and then *verified numerically*
(:func:`outputs_match`): the shrunk copy must reproduce the masked model's logits, so a custom
model whose forward pass does not follow its registration order is never shrunk silently wrong.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from robustcnn.errors import ModelError

_WEIGHTED = (nn.Conv2d, nn.BatchNorm2d, nn.Linear)


@dataclass(frozen=True)
class ConvUnit:
    """A conv layer and the batch norm that directly follows it (if any)."""

    conv_name: str
    conv: nn.Conv2d
    bn_name: str | None = None
    bn: nn.BatchNorm2d | None = None


@dataclass(frozen=True)
class Chain:
    """A plain conv chain: conv units in data-flow order, then the first linear layer (the head)."""

    convs: tuple[ConvUnit, ...]
    head_name: str
    head: nn.Linear
    #: Input features of the head per channel of the last conv (H*W of its flattened map).
    spatial: int


def weighted_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Conv2d, BatchNorm2d and Linear modules in registration order, with their full names."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, _WEIGHTED)]


def conv_units(model: nn.Module) -> list[ConvUnit]:
    """Every Conv2d with the BatchNorm2d registered right after it (same channel count), if any."""
    layers = weighted_layers(model)
    units: list[ConvUnit] = []
    for i, (name, module) in enumerate(layers):
        if not isinstance(module, nn.Conv2d):
            continue
        nxt = layers[i + 1] if i + 1 < len(layers) else None
        if (
            nxt is not None
            and isinstance(nxt[1], nn.BatchNorm2d)
            and nxt[1].num_features == module.out_channels
        ):
            units.append(ConvUnit(name, module, nxt[0], nxt[1]))
        else:
            units.append(ConvUnit(name, module))
    return units


def output_layer_name(model: nn.Module) -> str | None:
    """Name of the last conv/linear layer (the one producing the logits)."""
    names = [n for n, m in weighted_layers(model) if isinstance(m, nn.Conv2d | nn.Linear)]
    return names[-1] if names else None


def find_chain(model: nn.Module) -> tuple[Chain | None, str]:
    """The model's plain conv chain, or ``None`` and the reason it is not one."""
    for name, module in model.named_modules():
        own = list(module.parameters(recurse=False)) + list(module.buffers(recurse=False))
        if own and not isinstance(module, _WEIGHTED) and module is not model:
            return None, f"layer {name!r} ({type(module).__name__}) is not conv/batch-norm/linear"
    layers = weighted_layers(model)
    kinds = "".join(
        "C" if isinstance(m, nn.Conv2d) else "B" if isinstance(m, nn.BatchNorm2d) else "L" for _, m in layers
    )
    if not re.fullmatch(r"(CB?)+L+", kinds):
        return None, "the layers are not a conv[-batch-norm] sequence followed by linear layers"
    units = conv_units(model)
    previous: int | None = None
    for unit in units:
        conv = unit.conv
        if conv.groups != 1:
            return None, f"{unit.conv_name} is a grouped/depthwise conv (groups={conv.groups})"
        if previous is not None and conv.in_channels != previous:
            return None, f"{unit.conv_name} takes {conv.in_channels} channels but receives {previous}"
        previous = conv.out_channels
    head_name, head = next((n, m) for n, m in layers if isinstance(m, nn.Linear))
    assert isinstance(head, nn.Linear) and previous is not None
    if head.in_features % previous:
        return None, f"{head_name} has {head.in_features} inputs, not a multiple of {previous} channels"
    return Chain(tuple(units), head_name, head, head.in_features // previous), ""


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, leaf, module)


def _sub_conv(conv: nn.Conv2d, keep_out: Tensor, keep_in: Tensor | None) -> nn.Conv2d:
    weight = conv.weight.detach()[keep_out]
    if keep_in is not None:
        weight = weight[:, keep_in]
    # torch's stubs type a Conv2d's geometry as tuple[int, ...] (any length) and its constructor's
    # arguments as pairs, so each of them needs an ignore
    new = nn.Conv2d(
        weight.shape[1],
        weight.shape[0],
        conv.kernel_size,  # type: ignore[arg-type]
        stride=conv.stride,  # type: ignore[arg-type]
        padding=conv.padding,  # type: ignore[arg-type]
        dilation=conv.dilation,  # type: ignore[arg-type]
        bias=conv.bias is not None,
        padding_mode=conv.padding_mode,
        device=weight.device,
        dtype=weight.dtype,
    )
    with torch.no_grad():
        new.weight.copy_(weight)
        if conv.bias is not None:
            assert new.bias is not None  # built with bias=True
            new.bias.copy_(conv.bias.detach()[keep_out])
    new.train(conv.training)
    return new


def _sub_bn(bn: nn.BatchNorm2d, keep: Tensor) -> nn.BatchNorm2d:
    ref = bn.weight if bn.weight is not None else bn.running_mean
    new = nn.BatchNorm2d(
        int(keep.numel()),
        eps=bn.eps,
        momentum=bn.momentum,
        affine=bn.affine,
        track_running_stats=bn.track_running_stats,
        device=None if ref is None else ref.device,
        dtype=None if ref is None else ref.dtype,
    )
    # per-channel entries (scale, shift, running statistics) keep the kept channels; the 0-d
    # num_batches_tracked is copied as it is; what the layer does not have is in neither state
    state = {name: value[keep] if value.dim() else value for name, value in bn.state_dict().items()}
    new.load_state_dict(state)
    new.train(bn.training)
    return new


def _sub_linear_inputs(linear: nn.Linear, columns: Tensor) -> nn.Linear:
    weight = linear.weight.detach()[:, columns]
    new = nn.Linear(
        weight.shape[1],
        weight.shape[0],
        bias=linear.bias is not None,
        device=weight.device,
        dtype=weight.dtype,
    )
    with torch.no_grad():
        new.weight.copy_(weight)
        if linear.bias is not None:
            new.bias.copy_(linear.bias.detach())
    new.train(linear.training)
    return new


def shrink_chain(model: nn.Module, chain: Chain, kept: Mapping[str, Tensor]) -> None:
    """Replace, in place, every conv of ``chain`` by one holding only the ``kept[conv_name]`` output
    channels (the next conv's inputs, the batch norms and the head's input features follow)."""
    previous: Tensor | None = None
    for unit in chain.convs:
        keep = kept[unit.conv_name].to(device=unit.conv.weight.device, dtype=torch.long)
        _set_module(model, unit.conv_name, _sub_conv(unit.conv, keep, previous))
        if unit.bn is not None and unit.bn_name is not None:
            _set_module(model, unit.bn_name, _sub_bn(unit.bn, keep))
        previous = keep
    assert previous is not None
    offsets = torch.arange(chain.spatial, device=previous.device)
    columns = (previous.view(-1, 1) * chain.spatial + offsets).flatten()
    _set_module(model, chain.head_name, _sub_linear_inputs(chain.head, columns.to(chain.head.weight.device)))


def shrink_to_counts(model: nn.Module, counts: Mapping[str, int]) -> None:
    """Give the chain's convs ``counts[name]`` output channels (the first ones): the shapes only,
    for loading weights saved from a model shrunk by :func:`shrink_chain`."""
    chain, reason = find_chain(model)
    missing = [] if chain is None else sorted(u.conv_name for u in chain.convs if u.conv_name not in counts)
    if chain is None or missing:
        why = reason if chain is None else f"no kept-channel count for layer(s) {missing}"
        raise ModelError(
            f"cannot rebuild the channel-pruned model recorded with the cached weights ({why}); the "
            "entry was made for another architecture: delete it from the weight cache to prune again"
        )
    shrink_chain(model, chain, {u.conv_name: torch.arange(int(counts[u.conv_name])) for u in chain.convs})


@torch.no_grad()
def outputs_match(
    reference: nn.Module, candidate: nn.Module, x: Tensor, rtol: float = 1e-4
) -> tuple[bool, float]:
    """Whether both models give the same eval-mode outputs on ``x`` (max abs difference returned)."""
    modes = (reference.training, candidate.training)
    reference.eval()
    candidate.eval()
    try:
        a, b = reference(x).float(), candidate(x).float()
    finally:
        reference.train(modes[0])
        candidate.train(modes[1])
    diff = float((a - b).abs().max()) if a.numel() else 0.0
    return diff <= rtol * (1.0 + float(a.abs().max())), diff
