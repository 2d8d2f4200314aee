"""A model of either family, with its weights, exported for deployment without JAX (ONNX) or as StableHLO.

The exported function is the network's inference forward (`train=False`), on NCHW float32 RGB images normalised as
in training, returning the model's outputs in NCHW: EEffPose `heatmaps` (N, J, H/4, W/4); DEM `offsets_quarter`,
`offsets_half`, `heatmaps_tags_quarter`, `heatmaps_half`. NCHW is what ONNX runtimes and the original PyTorch models
use, so an export drops into code written for the originals. Everything after the network (flip test, decoding,
grouping) stays with the caller: it is the same numpy code the library runs (`meme_jax.topdown.poses`), and a bare
network is what TensorRT and OpenVINO optimise best (argmax and gathers would tie them to the original decoding).

Depthwise convolutions are built as XLA's grouped convolution, which ONNX writes as Conv(group=C) and every
accelerator runtime has a kernel for. BatchNorm is folded into the convolutions (`meme_jax.export.graph`).
The model's metadata says what a caller needs: `meme_jax.model`, `.family`, `.input_layout`, `.color`, `.mean`,
`.std` (on images scaled to [0, 1]), `.input_size` (W,H), `.batch`, `.precision`, `.outputs`, `.config` (JSON).
"""
import copy
from typing import Any, Dict, Optional

import jax
from jax import export as jax_export
import jax.numpy as jnp

import meme_jax
from data_pipelines.images import IMAGENET_MEAN, IMAGENET_STD
from meme_jax import models
from meme_jax import tasks
from meme_jax.export import graph as graph_lib
from meme_jax.export import stablehlo

FORMATS = ("onnx", "stablehlo")


def export_config(config):
  """The config the export is built from: the grouped depthwise convolution, float32 (lowered by the writers)."""
  config = copy.deepcopy(config)
  with config.unlocked():
    config.model.depthwise_impl = "conv"
    config.model.dtype = "float32"
    config.model.target_platform = ""
  return config


def nchw_forward(config, variables):
  """images (N, 3, H, W) -> the model's outputs, each NCHW; the weights are constants of the function."""
  model = models.build_model(export_config(config))

  def forward(images):
    outputs = model.apply(variables, jnp.transpose(images, (0, 2, 3, 1)), train=False)
    outputs = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
    return tuple(jnp.transpose(o, (0, 3, 1, 2)) for o in outputs)
  return forward


def input_spec(config, batch: Optional[int]) -> jax.ShapeDtypeStruct:
  """(N, 3, H, W) float32; N symbolic when `batch` is None (a dynamic-batch export)."""
  width, height = models.input_size(config)
  if batch is None:
    (n,) = jax_export.symbolic_shape("N")
  else:
    if int(batch) < 1:
      raise ValueError(f"batch={batch}: expected a positive batch, or None for a dynamic one")
    n = int(batch)
  return jax.ShapeDtypeStruct((n, 3, height, width), jnp.float32)


def folded_graph(config, variables, batch: Optional[int] = None,
                 spec: Optional[jax.ShapeDtypeStruct] = None) -> graph_lib.Graph:
  return graph_lib.trace(nchw_forward(config, variables), input_spec(config, batch) if spec is None else spec)


def metadata(config, batch: Optional[int], precision: str) -> Dict[str, str]:
  width, height = models.input_size(config)
  name = config.model.name
  return {
      "meme_jax.version": meme_jax.__version__,
      "meme_jax.model": name,
      "meme_jax.family": tasks.model_family(config),
      "meme_jax.input_layout": "NCHW",
      "meme_jax.output_layout": "NCHW",
      "meme_jax.color": "RGB",
      "meme_jax.mean": ",".join(f"{v:g}" for v in IMAGENET_MEAN),
      "meme_jax.std": ",".join(f"{v:g}" for v in IMAGENET_STD),
      "meme_jax.input_size": f"{width},{height}",
      "meme_jax.batch": "dynamic" if batch is None else str(int(batch)),
      "meme_jax.precision": precision,
      "meme_jax.outputs": ",".join(models.output_names(config)),
      "meme_jax.config": config.to_json_best_effort(),
  }


def export_model(config, variables: Any, fmt: str, *, batch: Optional[int] = None,
                 precision: str = "float32") -> bytes:
  """The serialised export of `variables` under `config`: an ONNX model or a `jax.export` StableHLO module."""
  if fmt not in FORMATS:
    raise ValueError(f"format {fmt!r}: expected one of {FORMATS}")
  graph_lib.jax_dtype(precision)
  # One spec for tracing and serialising: a symbolic batch is only equal to itself.
  spec = input_spec(config, batch)
  graph = folded_graph(config, variables, spec=spec)
  names = models.output_names(config)
  if fmt == "stablehlo":
    return stablehlo.serialize(graph, spec, names, precision)
  # onnx is the [export] extra's: a StableHLO export does not need it.
  from meme_jax.export import onnx_writer  # pylint: disable=import-outside-toplevel
  model = onnx_writer.to_onnx(graph, names, precision=precision, metadata=metadata(config, batch, precision),
                              doc=f"meme_jax {config.model.name}: {tasks.model_family(config)} pose model")
  return model.SerializeToString()

