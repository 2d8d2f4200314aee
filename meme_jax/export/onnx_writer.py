"""A folded inference program (`meme_jax.export.graph.Graph`) written as an ONNX model.

Each primitive becomes the ONNX operator with its semantics; the program's own layouts are kept, so a convolution
over NHWC tensors is written as Transpose -> Conv (NCHW) -> Transpose, and runtimes (onnxruntime's transpose
optimiser, TensorRT) cancel the back-to-back transposes between layers. Convolutions carry their folded kernel and
bias; an input-dilated convolution (a transposed convolution) is written as ConvTranspose with the flipped kernel.
A symbolic batch axis becomes the dynamic dimension `N`.
"""
from typing import Dict, List, Mapping, Optional, Sequence

import numpy as np
import onnx
from onnx import helper

from meme_jax.export.graph import Const, Graph, Op, Tensor, UnsupportedError, is_static, jax_dtype
from meme_jax.export.graph import lowered_dtype

OPSET = 18
BATCH_DIM = "N"
_INT64_MIN = -(2 ** 63) + 1

_BINARY = {"add": "Add", "sub": "Sub", "mul": "Mul", "div": "Div", "max": "Max", "min": "Min", "pow": "Pow",
           "eq": "Equal", "lt": "Less", "le": "LessOrEqual", "gt": "Greater", "ge": "GreaterOrEqual"}
_UNARY = {"neg": "Neg", "abs": "Abs", "exp": "Exp", "log": "Log", "sqrt": "Sqrt", "tanh": "Tanh",
          "logistic": "Sigmoid", "floor": "Floor", "ceil": "Ceil", "sign": "Sign", "erf": "Erf"}
_REDUCE = {"reduce_sum": "ReduceSum", "reduce_max": "ReduceMax", "reduce_min": "ReduceMin",
           "reduce_prod": "ReduceProd"}


def tensor_type(dtype: np.dtype) -> int:
  if np.dtype(dtype).name == "bfloat16":
    return onnx.TensorProto.BFLOAT16
  return helper.np_dtype_to_tensor_dtype(np.dtype(dtype))


def _dims(shape) -> List:
  return [int(d) if is_static(d) else BATCH_DIM for d in shape]


def _array_proto(name: str, value: np.ndarray) -> onnx.TensorProto:
  value = np.ascontiguousarray(value)
  if value.dtype.name == "bfloat16":
    return helper.make_tensor(name, onnx.TensorProto.BFLOAT16, value.shape, value.view(np.uint16).tobytes(),
                              raw=True)
  return onnx.numpy_helper.from_array(value, name)


class _Writer:

  def __init__(self, precision: np.dtype):
    self.precision = np.dtype(precision)
    self.nodes: List[onnx.NodeProto] = []
    self.initializers: List[onnx.TensorProto] = []
    self.const_names: Dict[int, str] = {}
    self.count = 0

  def fresh(self, hint: str) -> str:
    self.count += 1
    return f"{hint}_{self.count}"

  def constant(self, value: np.ndarray, hint: str = "c") -> str:
    name = self.fresh(hint)
    value = np.asarray(value)
    self.initializers.append(_array_proto(name, value.astype(lowered_dtype(value.dtype, self.precision))))
    return name

  def ref(self, value, full: bool = False) -> str:
    """The name of a tensor, or of an initializer holding a constant (broadcastable, or at its full shape)."""
    if isinstance(value, Tensor):
      return value.name
    key = (id(value), full)
    if key not in self.const_names:
      array = value.full() if full else np.asarray(value.value).astype(value.dtype)
      self.const_names[key] = self.constant(array)
    return self.const_names[key]

  def node(self, op_type: str, inputs: Sequence[str], output: Optional[str] = None, **attrs) -> str:
    output = output or self.fresh(op_type.lower())
    self.nodes.append(helper.make_node(op_type, list(inputs), [output], name=self.fresh(op_type), **attrs))
    return output

  def shape_const(self, shape) -> str:
    """A Reshape/Expand shape: the symbolic batch (at most one axis) as -1."""
    if sum(not is_static(d) for d in shape) > 1:
      raise UnsupportedError(f"a reshape to {shape} with more than one symbolic axis")
    return self.constant(np.asarray([int(d) if is_static(d) else -1 for d in shape], np.int64), "shape")

  # -------------------------------------------------------------------------------------------------------------

  def write(self, op: Op) -> None:
    name, p, out = op.primitive, op.params, op.output.name
    x = op.inputs[0] if op.inputs else None
    if name in _BINARY:
      a, b = op.inputs
      if name == "max" and isinstance(b, Const) and np.all(np.asarray(b.value) == 0):
        self.node("Relu", [self.ref(a)], out)
      else:
        self.node(_BINARY[name], [self.ref(a), self.ref(b)], out)
    elif name == "ne":
      self.node("Not", [self.node("Equal", [self.ref(op.inputs[0]), self.ref(op.inputs[1])])], out)
    elif name in ("and", "or"):
      boolean = np.dtype(op.output.dtype) == np.bool_
      op_type = {"and": "And", "or": "Or"}[name] if boolean else {"and": "BitwiseAnd", "or": "BitwiseOr"}[name]
      self.node(op_type, [self.ref(op.inputs[0]), self.ref(op.inputs[1])], out)
    elif name == "not":
      self.node("Not" if np.dtype(op.output.dtype) == np.bool_ else "BitwiseNot", [self.ref(x)], out)
    elif name in _UNARY:
      self.node(_UNARY[name], [self.ref(x)], out)
    elif name == "rsqrt":
      self.node("Reciprocal", [self.node("Sqrt", [self.ref(x)])], out)
    elif name == "square":
      self.node("Mul", [self.ref(x), self.ref(x)], out)
    elif name == "integer_pow":
      if p["y"] == 2:
        self.node("Mul", [self.ref(x), self.ref(x)], out)
      else:
        self.node("Pow", [self.ref(x), self.constant(np.asarray(p["y"], op.output.dtype))], out)
    elif name == "convert_element_type":
      self.node("Cast", [self.ref(x)], out, to=tensor_type(lowered_dtype(p["new_dtype"], self.precision)))
    elif name == "select_n":
      if len(op.inputs) != 3:
        raise UnsupportedError("select_n with more than two cases")
      pred = self.ref(op.inputs[0])
      if np.dtype(op.inputs[0].dtype) != np.bool_:
        pred = self.node("Cast", [pred], to=onnx.TensorProto.BOOL)
      self.node("Where", [pred, self.ref(op.inputs[2]), self.ref(op.inputs[1])], out)
    elif name == "clamp":
      low, value, high = op.inputs
      self.node("Max", [self.node("Min", [self.ref(value), self.ref(high)]), self.ref(low)], out)
    elif name == "reshape":
      self.node("Reshape", [self.ref(x, full=True), self.shape_const(p["new_sizes"])], out)
    elif name == "squeeze":
      self.node("Squeeze", [self.ref(x, full=True), self.constant(np.asarray(p["dimensions"], np.int64), "axes")],
                out)
    elif name == "transpose":
      self.node("Transpose", [self.ref(x, full=True)], out, perm=list(p["permutation"]))
    elif name == "broadcast_in_dim":
      self.broadcast(x, p["shape"], p["broadcast_dimensions"], out)
    elif name == "concatenate":
      self.node("Concat", [self.ref(v, full=True) for v in op.inputs], out, axis=int(p["dimension"]))
    elif name == "slice":
      starts, limits = list(p["start_indices"]), list(p["limit_indices"])
      steps = list(p["strides"]) if p.get("strides") else [1] * len(starts)
      self.slice(self.ref(x, full=True), starts, limits, steps, out)
    elif name == "rev":
      dims = list(p["dimensions"])
      self.slice(self.ref(x, full=True), [-1] * len(dims), [_INT64_MIN] * len(dims), [-1] * len(dims), out, dims)
    elif name == "pad":
      self.pad(op, out)
    elif name in _REDUCE:
      self.node(_REDUCE[name], [self.ref(x, full=True), self.constant(np.asarray(p["axes"], np.int64), "axes")], out,
                keepdims=0)
    elif name == "argmax":
      (axis,) = p["axes"]
      index = self.node("ArgMax", [self.ref(x, full=True)], axis=int(axis), keepdims=0)
      self.node("Cast", [index], out, to=tensor_type(p["index_dtype"]))
    elif name in ("reduce_window_max", "reduce_window_sum"):
      self.pool(op, out)
    elif name == "dot_general":
      self.einsum(op, out)
    elif name == "conv_general_dilated":
      self.conv(op, out)
    elif name == "split":
      outputs = [t.name for t in p["outputs"]]
      self.nodes.append(helper.make_node("Split", [self.ref(x, full=True),
                                                   self.constant(np.asarray(p["sizes"], np.int64), "split")],
                                         outputs, name=self.fresh("Split"), axis=int(p["axis"])))
    else:
      raise UnsupportedError(f"the export cannot write the JAX primitive {name!r} (at {out})")

  def broadcast(self, x: Tensor, shape, dims, out: str) -> None:
    kept = [1] * len(shape)
    for i, d in enumerate(dims):
      kept[d] = x.shape[i]
    source = self.ref(x)
    expand = [1 if (not is_static(s) or s == k) else int(s) for s, k in zip(shape, kept)]
    needs_expand = any(e != 1 for e in expand)
    if len(x.shape) != len(shape) or list(dims) != list(range(len(shape))):
      source = self.node("Reshape", [source, self.shape_const(kept)], None if needs_expand else out)
    elif not needs_expand:
      self.node("Identity", [source], out)
    if needs_expand:
      self.node("Expand", [source, self.constant(np.asarray(expand, np.int64), "shape")], out)

  def slice(self, source: str, starts, ends, steps, out: str, axes=None) -> str:
    axes = list(range(len(starts))) if axes is None else axes
    ints = lambda v: self.constant(np.asarray(v, np.int64), "index")  # noqa: E731
    return self.node("Slice", [source, ints(starts), ints(ends), ints(axes), ints(steps)], out)

  def pad(self, op: Op, out: str) -> None:
    x, value = op.inputs
    config = op.params["padding_config"]
    if any(interior for _, _, interior in config):
      raise UnsupportedError("pad with interior padding")
    low = [max(lo, 0) for lo, _, _ in config]
    high = [max(hi, 0) for _, hi, _ in config]
    if not isinstance(value, Const):
      raise UnsupportedError("pad with an input-dependent padding value")
    fill = np.asarray(value.value, op.output.dtype).reshape(())
    crop = any(lo < 0 or hi < 0 for lo, hi, _ in config)
    padded = self.node("Pad", [self.ref(x, full=True), self.constant(np.asarray(low + high, np.int64), "pads"),
                               self.constant(fill, "fill")], None if crop else out)
    if crop:
      starts = [-min(lo, 0) for lo, _, _ in config]
      ends = [hi if hi < 0 else 2 ** 62 for _, hi, _ in config]
      self.slice(padded, starts, ends, [1] * len(config), out)

  def pool(self, op: Op, out: str) -> None:
    """reduce_window max / sum as MaxPool / AveragePool over the windowed axes, the other two as (N, C)."""
    p = op.params
    (x,) = op.inputs
    window, strides, padding = list(p["window_dimensions"]), list(p["window_strides"]), list(p["padding"])
    if any(d != 1 for d in list(p["base_dilation"]) + list(p["window_dilation"])):
      raise UnsupportedError(f"{op.primitive} with dilation")
    pooled = [i for i in range(len(window)) if window[i] != 1 or strides[i] != 1 or tuple(padding[i]) != (0, 0)]
    others = [i for i in range(len(window)) if i not in pooled]
    if len(others) != 2 or not pooled:
      raise UnsupportedError(f"{op.primitive} over axes {pooled} of a rank-{len(window)} tensor")
    perm = others + pooled
    source = self.node("Transpose", [self.ref(x, full=True)], perm=perm)
    attrs = dict(kernel_shape=[window[i] for i in pooled], strides=[strides[i] for i in pooled],
                 pads=[padding[i][0] for i in pooled] + [padding[i][1] for i in pooled])
    if op.primitive == "reduce_window_max":
      pooled_out = self.node("MaxPool", [source], **attrs)
    else:
      # A window sum is the average over the full window (padding counted) times its size.
      average = self.node("AveragePool", [source], count_include_pad=1, **attrs)
      size = np.asarray(float(np.prod([window[i] for i in pooled])), op.output.dtype)
      pooled_out = self.node("Mul", [average, self.constant(size)])
    self.node("Transpose", [pooled_out], out, perm=list(np.argsort(perm)))

  def matrix_product(self, op: Op, out: str) -> bool:
    """A tensor contracted on one axis with a constant matrix (the align-corners resizes) as one MatMul, which
    runtimes run far faster than the general Einsum. False when the product is not of that form."""
    a, b = op.inputs
    (contract_a, contract_b), (batch_a, _) = op.params["dimension_numbers"]
    if batch_a or len(contract_a) != 1:
      return False
    if isinstance(b, Const) and isinstance(a, Tensor) and len(b.shape) == 2:
      x, k, matrix, c, matrix_first = a, contract_a[0], b.full(), contract_b[0], False
    elif isinstance(a, Const) and isinstance(b, Tensor) and len(a.shape) == 2:
      x, k, matrix, c, matrix_first = b, contract_b[0], a.full(), contract_a[0], True
    else:
      return False
    rank = len(x.shape)
    source = self.ref(x)
    if k != rank - 1:
      source = self.node("Transpose", [source], perm=[d for d in range(rank) if d != k] + [k])
    weights = self.constant(matrix if c == 0 else matrix.T)        # (contracted, free)
    if matrix_first:
      # JAX puts the matrix's free axis first: (free, x's other axes).
      product = self.node("MatMul", [source, weights])
      self.node("Transpose", [product], out, perm=[rank - 1] + list(range(rank - 1)))
    else:
      self.node("MatMul", [source, weights], out)
    return True

  def einsum(self, op: Op, out: str) -> None:
    if self.matrix_product(op, out):
      return
    a, b = op.inputs
    (contract_a, contract_b), (batch_a, batch_b) = op.params["dimension_numbers"]
    letters = iter("abcdefghijklmnopqrstuvwxyz")
    sa = [""] * len(a.shape)
    sb = [""] * len(b.shape)
    for i, j in zip(batch_a, batch_b):
      sa[i] = sb[j] = next(letters)
    for i, j in zip(contract_a, contract_b):
      sa[i] = sb[j] = next(letters)
    for k in range(len(sa)):
      sa[k] = sa[k] or next(letters)
    for k in range(len(sb)):
      sb[k] = sb[k] or next(letters)
    result = ([sa[i] for i in batch_a] + [sa[k] for k in range(len(sa)) if k not in batch_a and k not in contract_a]
              + [sb[k] for k in range(len(sb)) if k not in batch_b and k not in contract_b])
    equation = f"{''.join(sa)},{''.join(sb)}->{''.join(result)}"
    self.node("Einsum", [self.ref(a, full=True), self.ref(b, full=True)], out, equation=equation)

  def conv(self, op: Op, out: str) -> None:
    p = op.params
    (x,) = op.inputs
    dtype = p["dtype"]
    lhs_spec, out_spec = list(p["lhs_spec"]), list(p["out_spec"])
    source = self.ref(x)
    if lhs_spec != list(range(len(lhs_spec))):
      source = self.node("Transpose", [source], perm=lhs_spec)
    kernel = p["kernel"]
    lows = [lo for lo, _ in p["padding"]]
    highs = [hi for _, hi in p["padding"]]
    inputs = [source]
    if any(d != 1 for d in p["lhs_dilation"]):
      # Input dilation = a transposed convolution: ConvTranspose correlates with the kernel flipped and its
      # in/out axes swapped, and its padding counts from the other side of the kernel.
      if p["feature_group_count"] != 1 or any(d != 1 for d in p["rhs_dilation"]) or any(
          s != 1 for s in p["window_strides"]):
        raise UnsupportedError("an input-dilated convolution with groups, kernel dilation or strides")
      sizes = kernel.shape[2:]
      pads = [k - 1 - lo for k, lo in zip(sizes, lows)] + [k - 1 - hi for k, hi in zip(sizes, highs)]
      if min(pads) < 0:
        raise UnsupportedError(f"an input-dilated convolution with padding {p['padding']} wider than its kernel")
      flipped = kernel[(slice(None), slice(None)) + (slice(None, None, -1),) * len(sizes)]
      inputs.append(self.constant(np.swapaxes(flipped, 0, 1).astype(dtype), "kernel"))
      op_type, attrs = "ConvTranspose", dict(strides=list(p["lhs_dilation"]), pads=pads)
    else:
      if min(lows + highs) < 0:
        raise UnsupportedError(f"a convolution with negative padding {p['padding']}")
      inputs.append(self.constant(kernel.astype(dtype), "kernel"))
      op_type, attrs = "Conv", dict(strides=list(p["window_strides"]), pads=lows + highs,
                                    dilations=list(p["rhs_dilation"]), group=int(p["feature_group_count"]))
    if p["bias"] is not None:
      inputs.append(self.constant(np.asarray(p["bias"]).astype(dtype), "bias"))
    back = list(np.argsort(out_spec))
    if back != list(range(len(back))):
      result = self.node(op_type, inputs, **attrs)
      self.node("Transpose", [result], out, perm=back)
    else:
      self.node(op_type, inputs, out, **attrs)


def to_onnx(graph: Graph, output_names: Sequence[str], *, input_name: str = "images", precision: str = "float32",
            metadata: Optional[Mapping[str, str]] = None, doc: str = "") -> onnx.ModelProto:
  """The ONNX model of `graph`: input `input_name`, outputs `output_names`, `metadata` as metadata_props.

  `precision` 'float16' computes in that type (float32 weights and casts lowered to it); the input
  and outputs stay float32, cast at the model's boundary, so callers feed the same arrays whatever the precision.
  """
  if len(output_names) != len(graph.outputs):
    raise ValueError(f"{len(graph.outputs)} outputs, {len(output_names)} names")
  lowered = np.dtype(jax_dtype(precision))
  if lowered.name == "bfloat16":
    # ONNX's Conv takes bfloat16 only from opset 22, and CPU runtimes have no bfloat16 kernels.
    raise ValueError("an ONNX export computes in float32 or float16; bfloat16 is for the StableHLO export")
  writer = _Writer(lowered)
  rename = {}
  if lowered != np.float32:
    writer.node("Cast", [input_name], graph.input.name, to=tensor_type(lowered))
  else:
    rename[graph.input.name] = input_name
  for op in graph.ops:
    writer.write(op)
  # The program's names of the input and outputs become the public ones.
  for value, name in zip(graph.outputs, output_names):
    if lowered != np.float32 and np.dtype(value.dtype) == np.float32:
      writer.node("Cast", [writer.ref(value, full=True)], name, to=onnx.TensorProto.FLOAT)
    elif isinstance(value, Tensor) and value.name not in rename and value.name != graph.input.name:
      rename[value.name] = name
    else:
      writer.node("Identity", [writer.ref(value, full=True)], name)
  for node in writer.nodes:
    node.input[:] = [rename.get(n, n) for n in node.input]
    node.output[:] = [rename.get(n, n) for n in node.output]
  inputs = [helper.make_tensor_value_info(input_name, tensor_type(graph.input.dtype), _dims(graph.input.shape))]
  outputs = [helper.make_tensor_value_info(name, tensor_type(v.dtype), _dims(v.shape))
             for v, name in zip(graph.outputs, output_names)]
  onnx_graph = helper.make_graph(writer.nodes, "meme_jax", inputs, outputs, initializer=writer.initializers,
                                 doc_string=doc)
  model = helper.make_model(onnx_graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="meme_jax")
  model.ir_version = min(model.ir_version, 10)
  for key, value in (metadata or {}).items():
    entry = model.metadata_props.add()
    entry.key, entry.value = key, str(value)
  onnx.checker.check_model(model)
  return model
