"""Run a TF.js graph model with torch operations, so its recognizer can be attacked with gradients.

Why an interpreter rather than a hand-written network per model: the human-models recognizers are
TensorFlow graphs (NodeDefs); executing their nodes one by one with torch functions reproduces them
exactly, op for op, and keeps autograd intact (as :mod:`robustcnn.deployed.onnx_torch` does for
ONNX). Tensors stay in the graph's NHWC layout, so constants, paddings, reductions and reshapes mean
what the graph says; convolutions run on an NCHW view of the same memory. Only the ops of the ported
graphs are implemented; any other is refused when the module is built, naming the op and the node.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustcnn.errors import ModelError
from robustcnn.models.face.tfjs_model import GraphModel, GraphNode

Op = Callable[[list[Tensor], GraphNode], Tensor]
_OPS: dict[str, Op] = {}


def _op(*names: str) -> Callable[[Op], Op]:
    def register(fn: Op) -> Op:
        for name in names:
            _OPS[name] = fn
        return fn

    return register


def _same_pads(size: int, kernel: int, stride: int, dilation: int) -> tuple[int, int]:
    """TF 'SAME' padding of one dimension: the extra pixel, if any, goes after (bottom/right)."""
    out = -(-size // stride)
    total = max((out - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    return total // 2, total - total // 2


def _conv(x: Tensor, w: Tensor, node: GraphNode, groups: int) -> Tensor:
    """NHWC ``x`` convolved with OIHW ``w`` as the node's strides, dilations and padding say."""
    if node.text("data_format") not in ("", "NHWC"):
        raise ModelError(f"TF.js node {node.name}: data_format {node.text('data_format')} is not supported")
    strides, dilations = node.ints("strides") or [1, 1, 1, 1], node.ints("dilations") or [1, 1, 1, 1]
    padding = node.text("padding")
    if padding == "SAME":
        top, bottom = _same_pads(x.shape[1], w.shape[2], strides[1], dilations[1])
        left, right = _same_pads(x.shape[2], w.shape[3], strides[2], dilations[2])
        x = F.pad(x, (0, 0, left, right, top, bottom))
    elif padding != "VALID":
        raise ModelError(f"TF.js node {node.name}: padding {padding!r} is not supported")
    out = F.conv2d(
        x.permute(0, 3, 1, 2), w, stride=strides[1:3], dilation=dilations[1:3], groups=groups
    )  # fmt: skip
    return out.permute(0, 2, 3, 1)


@_op("Conv2D")
def _conv2d(inputs: list[Tensor], node: GraphNode) -> Tensor:
    x, w = inputs  # filters HWIO
    return _conv(x, w.permute(3, 2, 0, 1), node, groups=1)


@_op("DepthwiseConv2dNative")
def _depthwise(inputs: list[Tensor], node: GraphNode) -> Tensor:
    x, w = inputs  # filters [H, W, C, multiplier] -> [C * multiplier, 1, H, W]
    h, k, c, m = w.shape
    return _conv(x, w.reshape(h, k, c * m).permute(2, 0, 1).unsqueeze(1), node, groups=c)


_BINARY: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "Add": torch.add,
    "AddV2": torch.add,
    "Sub": torch.sub,
    "Mul": torch.mul,
    "Maximum": torch.maximum,
    "Minimum": torch.minimum,
}


@_op(*_BINARY)
def _binary(inputs: list[Tensor], node: GraphNode) -> Tensor:
    a, b = inputs
    return _BINARY[node.op](a, b)


@_op("Relu")
def _relu(inputs: list[Tensor], node: GraphNode) -> Tensor:
    return F.relu(inputs[0])


@_op("Sigmoid")
def _sigmoid(inputs: list[Tensor], node: GraphNode) -> Tensor:
    return torch.sigmoid(inputs[0])


@_op("Softmax")
def _softmax(inputs: list[Tensor], node: GraphNode) -> Tensor:
    return torch.softmax(inputs[0], dim=-1)


@_op("Mean")
def _mean(inputs: list[Tensor], node: GraphNode) -> Tensor:
    x, axes = inputs
    return x.mean(dim=[int(a) for a in axes.flatten().tolist()], keepdim=node.flag("keep_dims"))


@_op("Pad")
def _pad(inputs: list[Tensor], node: GraphNode) -> Tensor:
    x, paddings = inputs  # [[before, after] per dimension], first dimension first
    pads: list[int] = []
    for before, after in reversed(paddings.tolist()):
        pads += [int(before), int(after)]
    return F.pad(x, pads)


@_op("Reshape")
def _reshape(inputs: list[Tensor], node: GraphNode) -> Tensor:
    x, shape = inputs
    return x.reshape([int(v) for v in shape.flatten().tolist()])


def _matmul(inputs: list[Tensor], node: GraphNode) -> Tensor:
    a, b = inputs[0], inputs[1]
    a = a.transpose(-1, -2) if node.flag("transpose_a") else a
    b = b.transpose(-1, -2) if node.flag("transpose_b") else b
    return a @ b


_op("MatMul")(_matmul)


@_op("_FusedMatMul")
def _fused_matmul(inputs: list[Tensor], node: GraphNode) -> Tensor:
    out, fused = _matmul(inputs, node), node.texts("fused_ops")
    if fused[:1] == ["BiasAdd"]:
        out, fused = out + inputs[2], fused[1:]
    if fused == ["Relu"]:
        return F.relu(out)
    if fused:
        raise ModelError(f"TF.js node {node.name}: _FusedMatMul with {fused} is not supported")
    return out


class TfjsGraph(nn.Module):
    """The graph from its placeholder to ``output``: NHWC float input -> that node's tensor.

    Float weights are frozen parameters (moved with the module, found by ``parameters()`` like any
    recognizer's, never trained); int32 ones (shapes, axes, paddings) stay on the CPU as host values.
    Only the nodes ``output`` depends on run.
    """

    def __init__(self, model: GraphModel, output: str) -> None:
        super().__init__()
        by_name = {node.name: node for node in model.nodes}
        if output not in by_name:
            raise ModelError(f"{model.path} has no node {output!r}: it is not the graph this port expects")
        self.order = _needed(by_name, output)
        placeholders = [n.name for n in self.order if n.op == "Placeholder"]
        if len(placeholders) != 1:
            raise ModelError(f"{model.path}: {output} depends on {len(placeholders)} inputs, expected one")
        self.input_name, self.output = placeholders[0], output
        self.host: dict[str, Tensor] = {}
        self.slots: dict[str, str] = {}
        for node in self.order:
            if node.op != "Const":
                continue
            if node.name not in model.weights:
                raise ModelError(f"{model.path}: constant {node.name} has no weights in the manifest")
            array = model.weights[node.name]
            if array.dtype == np.float32:
                slot = f"w{len(self.slots)}"
                weight = torch.from_numpy(np.ascontiguousarray(array))
                self.register_parameter(slot, nn.Parameter(weight, requires_grad=False))
                self.slots[node.name] = slot
            else:
                self.host[node.name] = torch.from_numpy(array.astype(np.int64))

    def forward(self, x: Tensor) -> Tensor:
        values: dict[str, Tensor] = {self.input_name: x}
        for node in self.order:
            if node.op == "Const":
                slot = self.slots.get(node.name)
                values[node.name] = getattr(self, slot) if slot else self.host[node.name]
            elif node.op != "Placeholder":
                values[node.name] = _OPS[node.op]([values[i] for i in node.inputs], node)
        return values[self.output]


def _needed(by_name: dict[str, GraphNode], output: str) -> list[GraphNode]:
    """The nodes ``output`` depends on, each after its inputs; ModelError naming an unsupported op."""
    order: list[GraphNode] = []
    state: dict[str, bool] = {}  # False: being visited, True: done
    stack: list[tuple[str, bool]] = [(output, False)]
    while stack:
        name, expanded = stack.pop()
        if expanded:
            state[name] = True
            order.append(by_name[name])
            continue
        if state.get(name) is True:
            continue
        if name not in by_name:
            raise ModelError(f"TF.js graph: input {name!r} names no node (damaged model.json)")
        node = by_name[name]
        if node.op not in (*_OPS, "Const", "Placeholder"):
            raise ModelError(
                f"TF.js graph op {node.op!r} (node {node.name}) is not supported by robustcnn's "
                f"interpreter (supported: {', '.join(sorted(_OPS))})"
            )
        if state.get(name) is False:
            raise ModelError(f"TF.js graph: node {name} depends on itself (damaged model.json)")
        state[name] = False
        stack.append((name, True))
        stack.extend((i, False) for i in node.inputs if state.get(i) is not True)
    return order
