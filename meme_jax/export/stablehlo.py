"""A folded inference program (`meme_jax.export.graph.Graph`) serialised as StableHLO with `jax.export`.

The program is evaluated with JAX again, op by op, so the serialised module is the folded one (no BatchNorm, the
constants computed once). `jax.export.deserialize(data).call(x)` runs it in any JAX of a compatible version, on
CPU, GPU or TPU; `.mlir_module()` of the deserialised object is the StableHLO text, for other StableHLO consumers.
"""
from typing import Any, Dict, Sequence

import jax
from jax import export as jax_export
import jax.numpy as jnp
import numpy as np

from meme_jax.export.graph import ELEMENTWISE, Graph, Op, Tensor, jax_dtype, lowered_dtype

# The export's own platforms: the built module runs on any of them.
PLATFORMS = ("cpu", "cuda", "tpu")


def _value(env: Dict[str, Any], value, precision: np.dtype, shape=None) -> Any:
  """A tensor's value, or a constant in the export precision (broadcast to `shape` when given)."""
  if isinstance(value, Tensor):
    return env[value.name]
  x = jnp.asarray(value.value, lowered_dtype(value.dtype, precision))
  return x if shape is None else jnp.broadcast_to(x, shape)


def _conv(op: Op, x, precision: np.dtype):
  p = op.params
  dtype = lowered_dtype(p["dtype"], precision)
  spec = p["lhs_spec"]
  # The folded OIHW kernel back in the layout the program's convolution was written with.
  kernel = jnp.asarray(p["kernel"].astype(dtype))
  out = jax.lax.conv_general_dilated(
      x, kernel, p["window_strides"], p["padding"], lhs_dilation=p["lhs_dilation"],
      rhs_dilation=p["rhs_dilation"], feature_group_count=p["feature_group_count"],
      dimension_numbers=jax.lax.ConvDimensionNumbers(spec, tuple(range(len(spec))), p["out_spec"]))
  if p["bias"] is not None:
    shape = [1] * out.ndim
    shape[p["out_spec"][1]] = -1
    out = out + jnp.asarray(p["bias"].astype(dtype)).reshape(shape)
  return out


def evaluate(graph: Graph, x, precision: str = "float32") -> Sequence[Any]:
  """Runs the folded program on `x` with JAX (traceable: jit and jax.export see only these ops).

  With `precision` 'float16' / 'bfloat16' the float32 constants and casts are lowered to it, and the outputs cast
  back to float32, as the ONNX writer does.
  """
  lowered = jax_dtype(precision)
  env: Dict[str, Any] = {graph.input.name: x.astype(lowered_dtype(x.dtype, lowered))}
  for op in graph.ops:
    name = op.primitive
    if name == "conv_general_dilated":
      env[op.output.name] = _conv(op, _value(env, op.inputs[0], lowered), lowered)
      continue
    params = {k: v for k, v in op.params.items() if k != "outputs"}
    if name == "convert_element_type":
      params["new_dtype"] = lowered_dtype(params["new_dtype"], lowered)
    # Constants are kept broadcastable; a primitive wants them at full shape (an elementwise one at its output's).
    args = [_value(env, v, lowered, op.output.shape if name in ELEMENTWISE else v.shape) for v in op.inputs]
    primitive = op.jax_primitive
    out = primitive.bind(*args, **params)
    outputs = op.params.get("outputs", [op.output])
    for t, o in zip(outputs, out if primitive.multiple_results else [out]):
      env[t.name] = o
  outputs = [_value(env, v, lowered, v.shape) for v in graph.outputs]
  return [o.astype(jnp.float32) if np.dtype(v.dtype) == np.float32 else o for o, v in zip(outputs, graph.outputs)]


def serialize(graph: Graph, spec: jax.ShapeDtypeStruct, output_names: Sequence[str],
              precision: str = "float32") -> bytes:
  """The folded program as a serialised `jax.export.Exported` (outputs: a dict by `output_names`)."""
  def fn(x):
    return dict(zip(output_names, evaluate(graph, x, precision)))
  exported = jax_export.export(jax.jit(fn), platforms=PLATFORMS)(spec)
  return bytes(exported.serialize())


def deserialize(data: bytes):
  return jax_export.deserialize(bytearray(data))

