"""Export: the original reference checkpoints, converted and exported, equal what the original code computed.

Truth is the references' own outputs (computed by the original PyTorch models in float64), hand-computed BatchNorm
folding, and the JAX model itself for the properties of the export (dynamic batch, precision, refusals).
"""
import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import onnx
import onnxruntime
import pytest

import meme_jax
from meme_jax import convert
from meme_jax.export import graph as graph_lib
from meme_jax.export import model as export_lib
from meme_jax.export import onnx_writer
from meme_jax.export import stablehlo
from meme_jax.models.layers import BatchNorm
from conftest import REPO_ROOT, shared_path

pytestmark = pytest.mark.xdist_group("export")

P0, DEM_TINY = "configs/eeffpose_p0.py", "configs/dem_w32_coco.py:tiny"
DEM_OUTPUTS = ("off_quarter", "off_half", "ae_quarter", "hm_half")


def export_onnx(graph) -> bytes:
  return onnx_writer.to_onnx(graph, ["out"]).SerializeToString()


def _session(data: bytes):
  return onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def p0():
  config = meme_jax.load_config(P0)
  variables = convert.from_torch(shared_path("reference", "eeffpose_p0_coco", "model_best.pth.xz"), config)
  return config, variables, dict(np.load(shared_path("reference", "eeffpose_p0_coco", "io.npz")))


@pytest.fixture(scope="module")
def dem():
  config = meme_jax.load_config(DEM_TINY)
  variables = convert.from_torch(shared_path("reference", "dem_tiny_coco", "model_best.pth.xz"), config)
  return config, variables, dict(np.load(shared_path("reference", "dem_tiny_coco", "io.npz")))


@pytest.fixture(scope="module")
def p0_onnx(p0):
  config, variables, _ = p0
  return export_lib.export_model(config, variables, "onnx", batch=None)


def test_p0_onnx_equals_the_original_in_onnxruntime(p0, p0_onnx):
  _, _, io = p0
  (heatmaps,) = _session(p0_onnx).run(None, {"images": io["input_nchw"]})
  assert heatmaps.shape == io["output_eval_f64"].shape
  assert np.abs(heatmaps - io["output_eval_f64"]).max() < 1e-4


def test_p0_onnx_has_batchnorm_folded_and_describes_itself(p0, p0_onnx):
  config, _, _ = p0
  model = onnx.load_from_string(p0_onnx)
  ops = [n.op_type for n in model.graph.node]
  # P0 has 286 convolutions and a BatchNorm after nearly every one: none of it (nor rsqrt) is left.
  assert ops.count("Conv") == 286
  assert not {"BatchNormalization", "Sqrt", "Reciprocal", "Sub"} & set(ops)
  assert [i.name for i in model.graph.input] == ["images"]
  assert [o.name for o in model.graph.output] == ["heatmaps"]
  dims = [d.dim_param or d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
  assert dims == ["N", 3, 256, 192]
  meta = {p.key: p.value for p in model.metadata_props}
  assert meta["meme_jax.model"] == "eeffpose" and meta["meme_jax.family"] == "topdown"
  assert meta["meme_jax.input_layout"] == "NCHW" and meta["meme_jax.color"] == "RGB"
  assert meta["meme_jax.mean"] == "0.485,0.456,0.406" and meta["meme_jax.std"] == "0.229,0.224,0.225"
  assert meta["meme_jax.input_size"] == "192,256" and meta["meme_jax.batch"] == "dynamic"
  assert json.loads(meta["meme_jax.config"])["model"]["name"] == config.model.name


def test_dynamic_batch_runs_at_one_and_five(p0, p0_onnx):
  _, _, io = p0
  session = _session(p0_onnx)
  (two,) = session.run(None, {"images": io["input_nchw"]})
  five = np.concatenate([io["input_nchw"]] * 3)[:5]
  (out5,) = session.run(None, {"images": five})
  (out1,) = session.run(None, {"images": io["input_nchw"][1:]})
  assert out5.shape == (5,) + two.shape[1:] and out1.shape == (1,) + two.shape[1:]
  np.testing.assert_allclose(out5[[0, 2, 4]], np.broadcast_to(two[0], (3,) + two.shape[1:]), atol=1e-5)
  np.testing.assert_allclose(out1[0], two[1], atol=1e-5)


def test_dem_onnx_equals_the_original_in_onnxruntime(dem):
  config, variables, io = dem
  data = export_lib.export_model(config, variables, "onnx", batch=1)
  session = _session(data)
  assert [o.name for o in session.get_outputs()] == list(meme_jax.models.output_names(config))
  outputs = session.run(None, {"images": io["input_nchw"]})
  for name, value in zip(DEM_OUTPUTS, outputs):
    assert value.shape == io[name].shape, name
    assert np.abs(value - io[name]).max() < 1e-3, name
  ops = {n.op_type for n in onnx.load_from_string(data).graph.node}
  assert "ConvTranspose" in ops and "Sqrt" not in ops


def test_stablehlo_reloads_and_equals_the_original(dem, p0):
  for (config, variables, io), names, refs, tol in (
      (dem, meme_jax.models.output_names(dem[0]), DEM_OUTPUTS, 1e-3),
      (p0, ("heatmaps",), ("output_eval_f64",), 1e-4)):
    data = export_lib.export_model(config, variables, "stablehlo", batch=None)
    exported = jax.export.deserialize(bytearray(data))
    out = exported.call(jnp.asarray(io["input_nchw"]))
    for name, ref in zip(names, refs):
      assert np.abs(np.asarray(out[name]) - io[ref]).max() < tol, name
  # The dynamic batch holds after the round trip.
  out = exported.call(jnp.asarray(np.concatenate([io["input_nchw"]] * 3)[:5]))
  assert out["heatmaps"].shape[0] == 5


def test_float16_onnx_runs_close_to_float32(dem):
  config, variables, io = dem
  data = export_lib.export_model(config, variables, "onnx", batch=None, precision="float16")
  outputs = _session(data).run(None, {"images": io["input_nchw"]})
  assert all(o.dtype == np.float32 for o in outputs)     # float16 inside, float32 at the boundary
  heat = outputs[3]
  assert np.abs(heat - io["hm_half"]).max() < 0.05 * np.abs(io["hm_half"]).max()
  with pytest.raises(ValueError, match="bfloat16 is for the StableHLO export"):
    export_lib.export_model(config, variables, "onnx", precision="bfloat16")


class _ConvBn(nn.Module):
  reuse: bool = False

  @nn.compact
  def __call__(self, x):
    y = nn.Conv(3, (3, 3), use_bias=True, name="conv")(x)
    z = BatchNorm(1e-3, name="bn")(y, True)
    return z + y if self.reuse else z


def _conv_bn_variables(seed=0):
  rng = np.random.default_rng(seed)
  return {"params": {"conv": {"kernel": rng.standard_normal((3, 3, 2, 3)).astype(np.float32),
                              "bias": rng.standard_normal(3).astype(np.float32)},
                     "bn": {"scale": np.array([0.5, 2.0, -1.0], np.float32),
                            "bias": np.array([0.1, 0.2, 0.3], np.float32)}},
          "batch_stats": {"bn": {"mean": np.array([1.0, -1.0, 0.5], np.float32),
                                 "var": np.array([4.0, 0.25, 1.0], np.float32)}}}


def test_batchnorm_folds_into_the_convolution_as_computed_by_hand():
  variables = _conv_bn_variables()
  fn = lambda x: _ConvBn().apply(variables, x)  # noqa: E731
  graph = graph_lib.trace(fn, jax.ShapeDtypeStruct((1, 5, 5, 2), jnp.float32))
  assert [op.primitive for op in graph.ops] == ["conv_general_dilated"]
  p = variables["params"]
  factor = p["bn"]["scale"] / np.sqrt(variables["batch_stats"]["bn"]["var"] + 1e-3)
  kernel = np.transpose(p["conv"]["kernel"], (3, 2, 0, 1)) * factor[:, None, None, None]
  bias = (p["conv"]["bias"] - variables["batch_stats"]["bn"]["mean"]) * factor + p["bn"]["bias"]
  np.testing.assert_allclose(graph.ops[0].params["kernel"], kernel, rtol=1e-6)
  np.testing.assert_allclose(graph.ops[0].params["bias"], bias, rtol=1e-6, atol=1e-7)
  x = np.random.default_rng(1).standard_normal((1, 5, 5, 2)).astype(np.float32)
  (folded,) = stablehlo.evaluate(graph, jnp.asarray(x))
  np.testing.assert_allclose(np.asarray(folded), np.asarray(fn(x)), atol=1e-5)


def test_a_convolution_output_used_twice_is_not_folded():
  variables = _conv_bn_variables()
  fn = lambda x: _ConvBn(reuse=True).apply(variables, x)  # noqa: E731
  graph = graph_lib.trace(fn, jax.ShapeDtypeStruct((1, 5, 5, 2), jnp.float32))
  assert graph.count("conv_general_dilated") == 1 and len(graph.ops) > 1
  x = np.random.default_rng(2).standard_normal((1, 5, 5, 2)).astype(np.float32)
  (out,) = _session(export_onnx(graph)).run(None, {"images": x})
  np.testing.assert_allclose(out, np.asarray(fn(x)), atol=1e-5)


def test_an_unsupported_primitive_is_named():
  graph = graph_lib.trace(lambda x: jnp.cumsum(x, axis=1), jax.ShapeDtypeStruct((2, 4), jnp.float32))
  with pytest.raises(graph_lib.UnsupportedError, match="cumsum"):
    export_onnx(graph)


def test_export_cli_writes_and_verifies(tmp_path):
  output = tmp_path / "dem.onnx"
  cmd = [sys.executable, "-m", "meme_jax.export", "--config", os.path.join(REPO_ROOT, "configs", "dem_w32_coco.py:tiny"),
         "--checkpoint", shared_path("reference", "dem_tiny_coco", "model_best.pth.xz"), "--output", str(output)]
  proc = subprocess.run(cmd, capture_output=True, text=True, timeout=400, cwd=str(tmp_path))
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert output.stat().st_size > 1e6
  assert "max |onnx - jax|" in proc.stdout and "heatmaps_half" in proc.stdout
  bad = subprocess.run(cmd[:-1] + [str(output), "--batch", "zero"], capture_output=True, text=True, timeout=400,
                       cwd=str(tmp_path))
  assert bad.returncode != 0 and "--batch='zero'" in bad.stderr


@pytest.mark.parametrize("model", [
    dict(backbone="efficientnet", neck="bifpn", head="sum"),      # the original's ablation 000: max-pooling BiFPN
    dict(backbone="eeffnet", neck="bifpn", head="attention"),     # 101
    dict(fuse_dense=False),
])
def test_ablation_variants_export_and_equal_the_jax_model(model):
  config = meme_jax.load_config(P0)
  config.model.update(model)
  config.data.image_size, config.data.heatmap_size = (128, 128), (32, 32)    # BiFPN halves down to 1/128
  module = meme_jax.models.build_model(export_lib.export_config(config))
  shapes = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), jnp.zeros((1, 128, 128, 3)), train=False))
  rng = np.random.default_rng(0)
  variables = jax.tree.map(lambda s: (rng.uniform(0.5, 1.5, s.shape) if len(s.shape) == 1 else
                                      rng.standard_normal(s.shape) / np.sqrt(np.prod(s.shape[:-1]))
                                      ).astype(np.float32), shapes)
  images = rng.standard_normal((2, 3, 128, 128)).astype(np.float32)
  (got,) = _session(export_lib.export_model(config, variables, "onnx")).run(None, {"images": images})
  (expected,) = jax.jit(export_lib.nchw_forward(config, variables))(images)
  assert np.abs(got - np.asarray(expected)).max() < 1e-4 * max(1.0, np.abs(np.asarray(expected)).max())
