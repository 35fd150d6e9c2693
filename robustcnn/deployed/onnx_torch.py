"""Run an ONNX graph with torch operations, so an ONNX model can be attacked white-box.

Why our own converter: onnx2torch imports torchvision (a multi-GB CUDA download on CPU machines),
and an audit needs gradients, which onnxruntime does not give. The graph is executed node by node
with torch functions (the forward pass of a small interpreter), which keeps autograd intact. Only
the operators that image classifiers use are supported; any other raises
:class:`UnsupportedOnnx`, and the audit then falls back to black-box attacks through onnxruntime
(and says so). The caller checks the conversion against onnxruntime on real inputs before trusting it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

if TYPE_CHECKING:  # onnx is imported where it is needed (only ONNX audits need it)
    import onnx


class UnsupportedOnnx(Exception):
    """The graph uses something the converter does not implement (the message says what)."""


Attrs = dict[str, Any]
Op = Callable[[list[Tensor | None], Attrs], Tensor | list[Tensor]]
_OPS: dict[str, Op] = {}


def _op(*names: str) -> Callable[[Op], Op]:
    def register(fn: Op) -> Op:
        for name in names:
            _OPS[name] = fn
        return fn

    return register


def _input(inputs: list[Tensor | None], index: int) -> Tensor:
    """Input ``index`` of a node, one the operator requires (a checked graph always has it)."""
    tensor = inputs[index]
    assert tensor is not None
    return tensor


def _ints(t: Tensor | None) -> list[int]:
    return [] if t is None else [int(v) for v in t.flatten().tolist()]


def _pads_2d(pads: Sequence[int], rank: int) -> tuple[list[int], bool]:
    """ONNX pads [x1_begin, x2_begin, ..., x1_end, x2_end] -> F.pad order (last dim first); symmetric?"""
    if not pads:
        return [0] * (2 * rank), True
    begins, ends = list(pads[:rank]), list(pads[rank:])
    torch_pads: list[int] = []
    for b, e in zip(reversed(begins), reversed(ends), strict=True):
        torch_pads += [b, e]
    return torch_pads, begins == ends


def _check_auto_pad(attrs: Attrs, op: str) -> None:
    auto = attrs.get("auto_pad", b"NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else str(auto)
    if auto not in ("NOTSET", "VALID"):
        raise UnsupportedOnnx(f"{op} with auto_pad={auto}")


@_op("Conv")
def _conv(inputs: list[Tensor | None], attrs: Attrs) -> Tensor:
    x, w = _input(inputs, 0), _input(inputs, 1)
    b = inputs[2] if len(inputs) > 2 else None
    _check_auto_pad(attrs, "Conv")
    rank = w.dim() - 2
    if rank != 2:
        raise UnsupportedOnnx(f"Conv over {rank} spatial dimensions")
    torch_pads, symmetric = _pads_2d(attrs.get("pads", []), rank)
    stride = attrs.get("strides", [1] * rank)
    dilation = attrs.get("dilations", [1] * rank)
    groups = int(attrs.get("group", 1))
    if symmetric:
        return F.conv2d(x, w, b, stride, attrs.get("pads", [0] * 2 * rank)[:rank], dilation, groups)
    return F.conv2d(F.pad(x, torch_pads), w, b, stride, 0, dilation, groups)


def _pool_padding(x: Tensor, attrs: Attrs, value: float) -> tuple[Tensor, list[int]]:
    _check_auto_pad(attrs, "pooling")
    rank = x.dim() - 2
    pads = attrs.get("pads", [])
    torch_pads, symmetric = _pads_2d(pads, rank)
    if symmetric:
        return x, list(pads[:rank]) if pads else [0] * rank
    return F.pad(x, torch_pads, value=value), [0] * rank


@_op("MaxPool")
def _maxpool(inputs: list[Tensor | None], attrs: Attrs) -> Tensor:
    x = _input(inputs, 0)
    if x.dim() != 4:
        raise UnsupportedOnnx("MaxPool over other than 2 spatial dimensions")
    x, padding = _pool_padding(x, attrs, float("-inf"))
    kernel = attrs["kernel_shape"]
    return F.max_pool2d(
        x,
        kernel,
        attrs.get("strides", kernel),
        padding,
        attrs.get("dilations", [1, 1]),
        ceil_mode=bool(attrs.get("ceil_mode", 0)),
    )


@_op("AveragePool")
def _avgpool(inputs: list[Tensor | None], attrs: Attrs) -> Tensor:
    x = _input(inputs, 0)
    if x.dim() != 4:
        raise UnsupportedOnnx("AveragePool over other than 2 spatial dimensions")
    count_pad = bool(attrs.get("count_include_pad", 0))
    x, padding = _pool_padding(x, attrs, 0.0)
    kernel = attrs["kernel_shape"]
    return F.avg_pool2d(
        x,
        kernel,
        attrs.get("strides", kernel),
        padding,
        ceil_mode=bool(attrs.get("ceil_mode", 0)),
        count_include_pad=count_pad,
    )


@_op("GlobalAveragePool")
def _gap(inputs: list[Tensor | None], attrs: Attrs) -> Tensor:
    x = _input(inputs, 0)
    return x.mean(dim=tuple(range(2, x.dim())), keepdim=True)


@_op("GlobalMaxPool")
def _gmp(inputs: list[Tensor | None], attrs: Attrs) -> Tensor:
    x = _input(inputs, 0)
    return x.amax(dim=tuple(range(2, x.dim())), keepdim=True)


@_op("Gemm")
def _gemm(inputs: list[Tensor | None], attrs: Attrs) -> Tensor:
    a, b = _input(inputs, 0), _input(inputs, 1)
    c = inputs[2] if len(inputs) > 2 else None
    if attrs.get("transA", 0):
        a = a.t()
    if attrs.get("transB", 0):
        b = b.t()
    out = float(attrs.get("alpha", 1.0)) * (a @ b)
    return out if c is None else out + float(attrs.get("beta", 1.0)) * c


@_op("MatMul")
def _matmul(inputs: list[Tensor | None], attrs: Attrs) -> Tensor:
    return _input(inputs, 0) @ _input(inputs, 1)


def _binary(fn: Callable[[Tensor, Tensor], Tensor]) -> Op:
    return lambda inputs, attrs: fn(_input(inputs, 0), _input(inputs, 1))


_op("Add")(_binary(torch.add))
_op("Sub")(_binary(torch.sub))
_op("Mul")(_binary(torch.mul))
_op("Div")(_binary(torch.div))
_op("Pow")(_binary(torch.pow))
_op("Max")(lambda inputs, attrs: torch.stack(torch.broadcast_tensors(*inputs)).amax(0))
_op("Min")(lambda inputs, attrs: torch.stack(torch.broadcast_tensors(*inputs)).amin(0))


def _unary(fn: Callable[[Tensor], Tensor]) -> Op:
    return lambda inputs, attrs: fn(_input(inputs, 0))


_op("Relu")(_unary(torch.relu))
_op("Sigmoid")(_unary(torch.sigmoid))
_op("Tanh")(_unary(torch.tanh))
_op("Exp")(_unary(torch.exp))
_op("Log")(_unary(torch.log))
_op("Sqrt")(_unary(torch.sqrt))
_op("Neg")(_unary(torch.neg))
_op("Abs")(_unary(torch.abs))
_op("Erf")(_unary(torch.erf))
_op("Floor")(_unary(torch.floor))
_op("Round")(_unary(torch.round))
_op("Sign")(_unary(torch.sign))
_op("Identity", "Dropout")(lambda inputs, attrs: _input(inputs, 0))


@_op("LeakyRelu")
def _leaky(inputs: list[Tensor | None], attrs: Attrs) -> Tensor:
    return F.leaky_relu(_input(inputs, 0), float(attrs.get("alpha", 0.01)))


@_op("Elu")
def _elu(inputs: list[Tensor | None], attrs: Attrs) -> Tensor:
    return F.elu(_input(inputs, 0), float(attrs.get("alpha", 1.0)))


@_op("HardSigmoid")
def _hardsigmoid(inputs: list[Tensor | None], attrs: Attrs) -> Tensor:
    x = _input(inputs, 0)
    return (float(attrs.get("alpha", 0.2)) * x + float(attrs.get("beta", 0.5))).clamp(0, 1)


@_op("HardSwish")
def _hardswish(inputs: list[Tensor | None], attrs: Attrs) -> Tensor:
    return F.hardswish(_input(inputs, 0))


@_op("Clip")
def _clip(inputs: list[Tensor | None], attrs: Attrs) -> Tensor:
    x = _input(inputs, 0)
    lo = inputs[1] if len(inputs) > 1 and inputs[1] is not None else attrs.get("min")
    hi = inputs[2] if len(inputs) > 2 and inputs[2] is not None else attrs.get("max")
    lo = float(lo) if lo is not None else None
    hi = float(hi) if hi is not None else None
    return x.clamp(lo, hi)


@_op("Softmax", "LogSoftmax")
def _softmax(inputs: list[Tensor | None], attrs: Attrs) -> Tensor:
    x = _input(inputs, 0)
    axis = int(attrs.get("axis", -1))
    return x.softmax(axis) if attrs["_op"] == "Softmax" else x.log_softmax(axis)


@_op("BatchNormalization")
def _batchnorm(inputs: list[Tensor | None], attrs: Attrs) -> Tensor:
    x = _input(inputs, 0)
    scale, bias, mean, var = inputs[1:5]
    return F.batch_norm(x, mean, var, scale, bias, False, 0.0, float(attrs.get("epsilon", 1e-5)))


@_op("Flatten")
def _flatten(inputs: list[Tensor | None], attrs: Attrs) -> Tensor:
    x = _input(inputs, 0)
    axis = int(attrs.get("axis", 1))
    axis = axis + x.dim() if axis < 0 else axis
    lead = 1
    for d in x.shape[:axis]:
        lead *= int(d)
    return x.reshape(lead, -1)


@_op("Reshape")
def _reshape(inputs: list[Tensor | None], attrs: Attrs) -> Tensor:
    x, shape = _input(inputs, 0), _ints(inputs[1])
    if not attrs.get("allowzero", 0):
        shape = [int(x.shape[i]) if v == 0 else v for i, v in enumerate(shape)]
    return x.reshape(shape)


@_op("Transpose")
def _transpose(inputs: list[Tensor | None], attrs: Attrs) -> Tensor:
    x = _input(inputs, 0)
    return x.permute(attrs.get("perm", list(reversed(range(x.dim())))))


@_op("Concat")
def _concat(inputs: list[Tensor | None], attrs: Attrs) -> Tensor:
    return torch.cat([t for t in inputs if t is not None], int(attrs["axis"]))


@_op("Shape")
def _shape(inputs: list[Tensor | None], attrs: Attrs) -> Tensor:
    x = _input(inputs, 0)
    return torch.tensor(list(x.shape), dtype=torch.int64)


@_op("Gather")
def _gather(inputs: list[Tensor | None], attrs: Attrs) -> Tensor:
    x, index = _input(inputs, 0), _input(inputs, 1)
    axis = int(attrs.get("axis", 0))
    index = index.long().to(x.device)
    flat = x.index_select(axis, index.flatten())
    shape = list(x.shape[:axis]) + list(index.shape) + list(x.shape[axis + 1 :])
    return flat.reshape(shape)


def _axes(inputs: list[Tensor | None], attrs: Attrs) -> list[int]:
    return _ints(inputs[1]) if len(inputs) > 1 and inputs[1] is not None else list(attrs.get("axes", []))


@_op("Unsqueeze")
def _unsqueeze(inputs: list[Tensor | None], attrs: Attrs) -> Tensor:
    x = _input(inputs, 0)
    axes = _axes(inputs, attrs)
    rank = x.dim() + len(axes)
    for axis in sorted(a + rank if a < 0 else a for a in axes):
        x = x.unsqueeze(axis)
    return x


@_op("Squeeze")
def _squeeze(inputs: list[Tensor | None], attrs: Attrs) -> Tensor:
    x = _input(inputs, 0)
    axes = _axes(inputs, attrs)
    if not axes:
        return x.squeeze()
    for axis in sorted((a + x.dim() if a < 0 else a for a in axes), reverse=True):
        x = x.squeeze(axis)
    return x


@_op("ReduceMean")
def _reduce_mean(inputs: list[Tensor | None], attrs: Attrs) -> Tensor:
    x = _input(inputs, 0)
    axes = _axes(inputs, attrs) or list(range(x.dim()))
    return x.mean(dim=axes, keepdim=bool(attrs.get("keepdims", 1)))


@_op("Pad")
def _pad(inputs: list[Tensor | None], attrs: Attrs) -> Tensor:
    x = _input(inputs, 0)
    mode = attrs.get("mode", b"constant")
    mode = mode.decode() if isinstance(mode, bytes) else str(mode)
    if mode != "constant":
        raise UnsupportedOnnx(f"Pad with mode={mode}")
    pads = _ints(inputs[1]) if len(inputs) > 1 else list(attrs.get("pads", []))
    value = float(inputs[2]) if len(inputs) > 2 and inputs[2] is not None else float(attrs.get("value", 0.0))
    torch_pads, _ = _pads_2d(pads, x.dim())
    return F.pad(x, torch_pads, value=value)


@_op("Cast")
def _cast(inputs: list[Tensor | None], attrs: Attrs) -> Tensor:
    x = _input(inputs, 0)
    to = int(attrs["to"])
    dtype = {
        1: torch.float32,
        6: torch.int32,
        7: torch.int64,
        9: torch.bool,
        10: torch.float16,
        11: torch.float64,
    }
    if to not in dtype:
        raise UnsupportedOnnx(f"Cast to ONNX type {to}")
    return x.to(dtype[to])


def _attributes(node: onnx.NodeProto) -> Attrs:
    from onnx import helper, numpy_helper

    attrs: Attrs = {"_op": node.op_type}
    for attr in node.attribute:
        value = helper.get_attribute_value(attr)
        if hasattr(value, "raw_data") or hasattr(value, "float_data"):  # a TensorProto
            value = torch.from_numpy(numpy_helper.to_array(value).copy())
        attrs[attr.name] = value
    return attrs


def _safe_name(name: str, taken: set[str]) -> str:
    base = re.sub(r"[^A-Za-z0-9_]", "_", name) or "t"
    candidate, i = base, 1
    while candidate in taken:
        candidate, i = f"{base}_{i}", i + 1
    taken.add(candidate)
    return candidate


class OnnxModule(nn.Module):
    """An ONNX graph as an ``nn.Module``: one image input, one logits output.

    Float initializers become parameters (so ``.to(device)`` moves them and the parameter count is
    the model's); integer ones (shapes, indices) stay plain tensors in ``consts``.
    """

    def __init__(self, model: onnx.ModelProto) -> None:
        super().__init__()
        from onnx import numpy_helper

        graph = model.graph
        if any(opset.domain not in ("", "ai.onnx") for opset in model.opset_import):
            domains = sorted({o.domain for o in model.opset_import} - {"", "ai.onnx"})
            raise UnsupportedOnnx(f"operators from the domain(s) {domains}")
        init_names = {t.name for t in graph.initializer}
        real_inputs = [i.name for i in graph.input if i.name not in init_names]
        if len(real_inputs) != 1 or len(graph.output) != 1:
            raise UnsupportedOnnx(f"{len(real_inputs)} inputs and {len(graph.output)} outputs (need 1 and 1)")
        unknown = sorted(
            {
                n.op_type
                for n in graph.node
                if n.domain not in ("", "ai.onnx") or (n.op_type not in _OPS and n.op_type != "Constant")
            }
        )
        if unknown:
            raise UnsupportedOnnx(f"the operator(s) {', '.join(unknown)}")
        self.input_name = real_inputs[0]
        self.output_name = graph.output[0].name
        self.params = nn.ParameterDict()
        self.param_of: dict[str, str] = {}
        self.consts: dict[str, Tensor] = {}
        taken: set[str] = set()
        for tensor in graph.initializer:
            value = torch.from_numpy(numpy_helper.to_array(tensor).copy())
            if value.is_floating_point():
                key = _safe_name(tensor.name, taken)
                self.params[key] = nn.Parameter(value.float(), requires_grad=False)
                self.param_of[tensor.name] = key
            else:
                self.consts[tensor.name] = value
        self.nodes = [(n.op_type, list(n.input), list(n.output), _attributes(n)) for n in graph.node]

    def forward(self, x: Tensor) -> Tensor:
        env: dict[str, Tensor | None] = {"": None, self.input_name: x}
        for name, key in self.param_of.items():
            env[name] = self.params[key]
        for name, value in self.consts.items():
            env[name] = value.to(x.device)
        for op, inputs, outputs, attrs in self.nodes:
            if op == "Constant":
                constant = attrs.get("value")
                if constant is None:
                    raise UnsupportedOnnx("a Constant without a tensor value")
                env[outputs[0]] = constant.to(x.device) if constant.is_floating_point() else constant
                continue
            result = _OPS[op]([env[name] for name in inputs], attrs)
            if isinstance(result, Tensor):
                env[outputs[0]] = result
            else:
                env.update(zip(outputs, result, strict=False))
        out = env[self.output_name]
        assert out is not None
        return out
