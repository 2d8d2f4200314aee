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

from meme_jax.export.graph import ELEMENTWISE, Graph, Op, Tensor, jax_dtype

# The export's own platforms: the built module runs on any of them.
PLATFORMS = ("cpu", "cuda", "tpu")


def _lowered(dtype, precision):
  return precision if np.dtype(dtype) == np.float32 else np.dtype(dtype)


def _value(env: Dict[str, Any], value) -> Any:
  if isinstance(value, Tensor):
    return env[value.name]
  return jnp.asarray(value.value, _lowered(value.dtype, env["precision"]))


def _full(env, value, shape) -> Any:
  x = _value(env, value)
  return x if isinstance(value, Tensor) else jnp.broadcast_to(x, shape)


def _conv(op: Op, x, precision):
  p = op.params
  dtype = _lowered(p["dtype"], precision)
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
  env: Dict[str, Any] = {"precision": lowered, graph.input.name: x.astype(_lowered(x.dtype, lowered))}
  for op in graph.ops:
    name = op.primitive
    if name == "conv_general_dilated":
      env[op.output.name] = _conv(op, _value(env, op.inputs[0]), lowered)
      continue
    params = {k: v for k, v in op.params.items() if k != "outputs"}
    if name == "convert_element_type":
      params["new_dtype"] = _lowered(params["new_dtype"], lowered)
    if name in ELEMENTWISE:
      # Elementwise operands may be constants kept broadcastable; the primitive wants the full shape.
      args = [_full(env, v, op.output.shape) for v in op.inputs]
    else:
      args = [_full(env, v, v.shape) for v in op.inputs]
    primitive = op.jax_primitive
    out = primitive.bind(*args, **params)
    outputs = op.params.get("outputs", [op.output])
    for t, o in zip(outputs, out if primitive.multiple_results else [out]):
      env[t.name] = o
  outputs = [env[v.name] if isinstance(v, Tensor) else jnp.broadcast_to(_value(env, v), v.shape)
             for v in graph.outputs]
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

