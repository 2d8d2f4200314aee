"""An inference function as a flat program of JAX primitives, with its weights folded in.

`trace(fn, spec)` traces `fn` (weights closed over) into a jaxpr and walks it once:
- every value that does not depend on the input (weights, BatchNorm statistics, fusion weights, the interpolation
  matrices of the align-corners resizes) is evaluated there and then and becomes a constant;
- a per-channel affine step right after a convolution (BatchNorm's `(x - mean) * rsqrt(var + eps) * scale + bias`,
  a conv bias) is folded into that convolution's kernel and bias, so BatchNorm disappears from the program;
- calls (`jit`, `custom_jvp_call`, `custom_vjp_call`) are inlined.

The result, `Graph`, is a list of `Op`s over `Tensor`s (input-dependent) and `Const`s. Constants keep the shape
the program gives them but store their value with size-1 axes where the program only broadcasts (a BatchNorm mean
is (1, 1, 1, C), not (N, H, W, C)), so that folding stays small and a symbolic batch axis needs no materialising.
Both writers read the same `Graph`: `meme_jax.export.onnx_writer` (ONNX) and `meme_jax.export.stablehlo` (which
evaluates it with JAX again and serialises it).
"""
import dataclasses
import operator
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import jax
from jax.extend import core as jax_core
import jax.numpy as jnp
import numpy as np

Shape = Tuple[Any, ...]          # ints, or symbolic dimensions (the batch of a dynamic-batch export)

# Elementwise primitives, with the numpy function used to fold them when every operand is a constant (None: the
# primitive's own `bind` folds them).
ELEMENTWISE = {
    "add": np.add, "sub": np.subtract, "mul": np.multiply, "div": np.divide, "max": np.maximum,
    "min": np.minimum, "pow": np.power, "neg": np.negative, "abs": np.abs, "exp": np.exp, "log": np.log,
    "sqrt": np.sqrt, "rsqrt": lambda x: 1.0 / np.sqrt(x), "tanh": np.tanh, "logistic": lambda x: 1 / (1 + np.exp(-x)),
    "floor": np.floor, "ceil": np.ceil, "sign": np.sign, "square": np.square,
    "eq": np.equal, "ne": np.not_equal, "lt": np.less, "le": np.less_equal, "gt": np.greater,
    "ge": np.greater_equal, "and": np.logical_and, "or": np.logical_or, "not": np.logical_not,
    "erf": None, "integer_pow": None, "select_n": None, "convert_element_type": None, "clamp": None,
}
_INLINED = {"jit": "jaxpr", "pjit": "jaxpr", "closed_call": "call_jaxpr", "core_call": "call_jaxpr",
            "custom_jvp_call": "call_jaxpr", "custom_vjp_call": "call_jaxpr", "custom_vjp_call_jaxpr": "fun_jaxpr",
            "remat": "jaxpr", "checkpoint": "jaxpr"}


PRECISIONS = ("float32", "float16", "bfloat16")


def jax_dtype(precision: str) -> np.dtype:
  """The numpy dtype of an export precision."""
  if precision not in PRECISIONS:
    raise ValueError(f"precision {precision!r}: expected one of {PRECISIONS}")
  return np.dtype(jnp.dtype(precision))


def lowered_dtype(dtype, precision: np.dtype) -> np.dtype:
  """A value's dtype in an export of `precision`: float32 is lowered to it, every other dtype kept."""
  return np.dtype(precision) if np.dtype(dtype) == np.float32 else np.dtype(dtype)


class UnsupportedError(ValueError):
  """The program uses something the export cannot write; the message names the primitive."""


def is_static(dim) -> bool:
  try:
    operator.index(dim)
    return True
  except TypeError:
    return False


@dataclasses.dataclass(eq=False)
class Tensor:
  """An input-dependent value: `name` in the written program."""
  name: str
  shape: Shape
  dtype: np.dtype


@dataclasses.dataclass(eq=False)
class Const:
  """A constant of `shape`; `value` is broadcastable to it (size-1 axes where the program only broadcasts)."""
  value: np.ndarray
  shape: Shape
  dtype: np.dtype

  def full(self) -> np.ndarray:
    if not all(is_static(d) for d in self.shape):
      raise UnsupportedError(f"a constant of shape {self.shape} with a symbolic axis is used where it must be "
                             f"materialised; export with a fixed batch (--batch N)")
    return np.broadcast_to(self.value, tuple(int(d) for d in self.shape)).astype(self.dtype)


Value = Union[Tensor, Const]


@dataclasses.dataclass(eq=False)
class Op:
  """One primitive applied to `inputs`, giving `output`. For convolutions the kernel is in `params['kernel']`
  (float64, OIHW: out-channels first) and `params['bias']` (float64 (O,) or None), not among the inputs."""
  primitive: str
  inputs: List[Value]
  params: Dict[str, Any]
  output: Tensor
  jax_primitive: Any = None      # the primitive itself, for evaluating the program with JAX again


@dataclasses.dataclass
class Graph:
  input: Tensor
  outputs: List[Value]
  ops: List[Op]

  def count(self, primitive: str) -> int:
    return sum(op.primitive == primitive for op in self.ops)


def _closed(jaxpr) -> Tuple[Any, Sequence[Any]]:
  if isinstance(jaxpr, jax_core.ClosedJaxpr):
    return jaxpr.jaxpr, jaxpr.consts
  return jaxpr, ()


def _use_counts(jaxpr) -> Dict[Any, int]:
  counts: Dict[Any, int] = {}
  for eqn in jaxpr.eqns:
    for v in eqn.invars:
      if not isinstance(v, jax_core.Literal):
        counts[v] = counts.get(v, 0) + 1
  for v in jaxpr.outvars:
    if not isinstance(v, jax_core.Literal):
      counts[v] = counts.get(v, 0) + 2      # an output is never folded away
  return counts


def _channel_vector(const: Const, rank: int, channel_axis: int) -> Optional[np.ndarray]:
  """The (C,) vector of a constant that varies along `channel_axis` only (or a scalar), else None."""
  value = np.asarray(const.value, np.float64)
  if value.ndim == 0:
    return value.reshape(1)
  if value.ndim != rank:
    return None
  if any(s != 1 for i, s in enumerate(value.shape) if i != channel_axis):
    return None
  return value.reshape(-1)


class _Tracer:
  """Walks a jaxpr, folding constants and per-channel affine steps into convolutions."""

  def __init__(self):
    self.ops: List[Op] = []
    self.names = 0
    # Tensor -> the convolution that produced it, while that tensor has no other use than the next affine step.
    self.conv_of: Dict[int, Op] = {}

  def new_tensor(self, aval) -> Tensor:
    self.names += 1
    return Tensor(f"t{self.names}", tuple(aval.shape), np.dtype(aval.dtype))

  def read(self, env, v) -> Value:
    if isinstance(v, jax_core.Literal):
      value = np.asarray(v.val)
      return Const(value, tuple(np.shape(value)), np.dtype(v.aval.dtype))
    return env[v]

  def run(self, jaxpr, consts, args: Sequence[Value]) -> List[Value]:
    env: Dict[Any, Value] = {}
    for var, c in zip(jaxpr.constvars, consts):
      value = np.asarray(c)
      env[var] = Const(value, value.shape, value.dtype)
    uses = _use_counts(jaxpr)
    for var, a in zip(jaxpr.invars, args):
      env[var] = a
      if isinstance(a, Tensor) and id(a) in self.conv_of and uses.get(var, 0) != 1:
        del self.conv_of[id(a)]           # an inlined call uses the raw convolution output more than once
    for eqn in jaxpr.eqns:
      inputs = [self.read(env, v) for v in eqn.invars]
      name = eqn.primitive.name
      if name in _INLINED:
        inner, inner_consts = _closed(eqn.params[_INLINED[name]])
        outs = self.run(inner, inner_consts, inputs)
      else:
        outs = self.apply(eqn, inputs, uses)
      for var, out in zip(eqn.outvars, outs):
        env[var] = out
        if isinstance(out, Tensor) and id(out) in self.conv_of and uses.get(var, 0) != 1:
          del self.conv_of[id(out)]       # used twice: its raw value is needed, so nothing more folds into it
    return [self.read(env, v) for v in jaxpr.outvars]

  # -------------------------------------------------------------------------------------------------------------

  def apply(self, eqn, inputs: List[Value], uses) -> List[Value]:
    name = eqn.primitive.name
    params = dict(eqn.params)
    if all(isinstance(x, Const) for x in inputs) and (
        ELEMENTWISE.get(name) is not None or name == "broadcast_in_dim"
        or all(all(is_static(d) for d in v.aval.shape) for v in eqn.outvars)):
      return self.fold(eqn, inputs)
    if name in ("add", "sub", "mul", "div"):
      folded = self.fold_into_conv(name, inputs)
      if folded is not None:
        return [folded]
    if name == "broadcast_in_dim" and isinstance(inputs[0], Const):
      return [self.broadcast_const(inputs[0], params["shape"], params["broadcast_dimensions"],
                                   eqn.outvars[0].aval.dtype)]
    if name == "conv_general_dilated":
      return [self.conv(eqn, inputs)]
    if name in ("copy", "copy_p", "optimization_barrier"):
      return list(inputs)
    out = self.new_tensor(eqn.outvars[0].aval)
    if len(eqn.outvars) != 1:
      outs = [out] + [self.new_tensor(v.aval) for v in eqn.outvars[1:]]
      params["outputs"] = outs
    else:
      outs = [out]
    self.ops.append(Op(name, inputs, params, out, eqn.primitive))
    return outs

  def fold(self, eqn, inputs: List[Const]) -> List[Value]:
    name = eqn.primitive.name
    out_aval = eqn.outvars[0].aval
    fn = ELEMENTWISE.get(name)
    if fn is not None:
      value = fn(*[np.asarray(x.value) for x in inputs]).astype(out_aval.dtype)
      return [Const(value, tuple(out_aval.shape), np.dtype(out_aval.dtype))]
    if name == "broadcast_in_dim":
      return [self.broadcast_const(inputs[0], eqn.params["shape"], eqn.params["broadcast_dimensions"],
                                   out_aval.dtype)]
    # Everything else is evaluated by JAX itself, on the host, so its semantics are exactly the program's.
    with jax.default_device(jax.local_devices(backend="cpu")[0]):
      outs = eqn.primitive.bind(*[x.full() for x in inputs], **eqn.params)
    outs = outs if eqn.primitive.multiple_results else [outs]
    return [Const(np.asarray(o), tuple(np.shape(o)), np.dtype(o.dtype)) for o in outs]

  def broadcast_const(self, const: Const, shape, dims, dtype) -> Const:
    """broadcast_in_dim of a constant, kept with size-1 axes where it is only broadcast."""
    value = np.asarray(const.value)
    if value.ndim < len(const.shape):     # already broadcastable: pad to the operand's rank first
      value = value.reshape((1,) * (len(const.shape) - value.ndim) + value.shape)
    kept = [1] * len(shape)
    for i, d in enumerate(dims):
      kept[d] = value.shape[i]
    return Const(value.reshape(kept), tuple(shape), np.dtype(dtype))

  def conv(self, eqn, inputs: List[Value]) -> Tensor:
    x, kernel = inputs
    p = eqn.params
    if not isinstance(kernel, Const):
      raise UnsupportedError("conv_general_dilated with an input-dependent kernel")
    if not isinstance(x, Tensor):
      raise UnsupportedError("conv_general_dilated of a constant with an input-dependent kernel")
    if p["batch_group_count"] != 1:
      raise UnsupportedError("conv_general_dilated with batch_group_count > 1")
    dn = p["dimension_numbers"]
    # OIHW, float64 while affine steps fold into it.
    oihw = np.transpose(np.asarray(kernel.full(), np.float64), dn.rhs_spec)
    out = self.new_tensor(eqn.outvars[0].aval)
    params = dict(window_strides=tuple(p["window_strides"]), padding=tuple(tuple(q) for q in p["padding"]),
                  lhs_dilation=tuple(p["lhs_dilation"]), rhs_dilation=tuple(p["rhs_dilation"]),
                  feature_group_count=int(p["feature_group_count"]), lhs_spec=tuple(dn.lhs_spec),
                  out_spec=tuple(dn.out_spec), kernel=oihw, bias=None, dtype=np.dtype(eqn.outvars[0].aval.dtype))
    op = Op("conv_general_dilated", [x], params, out)
    self.ops.append(op)
    self.conv_of[id(out)] = op
    return out

  def fold_into_conv(self, name: str, inputs: List[Value]) -> Optional[Tensor]:
    """conv(x) op c, with c per output channel, as a convolution with a changed kernel and bias."""
    conv_side = [i for i, x in enumerate(inputs) if isinstance(x, Tensor) and id(x) in self.conv_of]
    if not conv_side:
      return None
    i = conv_side[0]
    other = inputs[1 - i]
    if not isinstance(other, Const) or (name in ("sub", "div") and i != 0):
      return None
    op = self.conv_of[id(inputs[i])]
    vector = _channel_vector(other, len(op.output.shape), op.params["out_spec"][1])
    if vector is None:
      return None
    kernel, bias = op.params["kernel"], op.params["bias"]
    channels = kernel.shape[0]
    vector = np.broadcast_to(vector, (channels,))
    bias = np.zeros((channels,)) if bias is None else bias
    if name in ("mul", "div"):
      factor = vector if name == "mul" else 1.0 / vector
      kernel = kernel * factor.reshape((-1,) + (1,) * (kernel.ndim - 1))
      bias = bias * factor
    else:
      bias = bias + vector if name == "add" else bias - vector
    op.params["kernel"], op.params["bias"] = kernel, bias
    return inputs[i]          # the convolution's output now is this step's value


def trace(fn: Callable, spec: jax.ShapeDtypeStruct) -> Graph:
  """The folded program of `fn(x)` for inputs like `spec` (whose leading axis may be symbolic)."""
  closed = jax.make_jaxpr(fn)(spec)
  tracer = _Tracer()
  x = Tensor("x", tuple(spec.shape), np.dtype(spec.dtype))
  outputs = tracer.run(closed.jaxpr, closed.consts, [x])
  return Graph(x, outputs, tracer.ops)
