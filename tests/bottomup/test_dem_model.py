"""DEM network: structure, parameter counts, checkpoint conversion and numerical parity with the original.

Truth comes from outside this code base: the original's state_dict key list (spec/dem_w32_512_state_dict.tsv), the
parameter counts measured on the original model, a checkpoint of the original with the outputs
it computed in float64 (reference/dem_tiny_coco), and torch itself for resizing and initialisation rules.
"""
import functools
import tempfile

import flax.linen as nn
from flax import traverse_util
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import meme_jax
from meme_jax import convert
from meme_jax import pretrained
from meme_jax.models import build_model
from meme_jax.models import hrnet
from conftest import shared_path
from original_checkpoints import HRNET_HEAD_PREFIXES, fake_imagenet_hrnet, torch_state_dict

TINY = "configs/dem_w32_coco.py:tiny"
OUTPUT_NAMES = ("off_quarter", "off_half", "ae_quarter", "hm_half")
@pytest.fixture(autouse=True)
def _mismatch_key_files_in_tmp_path(tmp_path, monkeypatch):
  """Checkpoint-mismatch errors write their key lists to the temporary directory: this test's, not the system's."""
  monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))


def _flatten(tree):
  """{path tuple: leaf} of a nested dict of arrays."""
  return traverse_util.flatten_dict(tree)


@functools.lru_cache(maxsize=None)
def _abstract_model(spec: str):
  """(output shapes, {collection: {path: shape}}) of a config's model at its input size, from one trace."""
  config = meme_jax.load_config(spec)
  model = build_model(config)
  width, height = config.data.image_size
  images = jax.ShapeDtypeStruct((2, height, width, 3), jnp.float32)
  outputs, variables = jax.eval_shape(
      lambda x: model.init_with_output(jax.random.PRNGKey(0), x, train=False), images)
  shapes = {c: {p: tuple(v.shape) for p, v in _flatten(t).items()}
            for c, t in variables.items()}
  return outputs, shapes


def _param_count(shapes) -> int:
  return int(sum(np.prod(s) for s in shapes["params"].values()))


@pytest.fixture(scope="module")
def reference():
  return dict(np.load(shared_path("reference", "dem_tiny_coco", "io.npz")))


@pytest.fixture(scope="module")
def tiny_checkpoint():
  return shared_path("reference", "dem_tiny_coco", "model_best.pth.xz")


@pytest.fixture(scope="module")
def tiny_config():
  return meme_jax.load_config(TINY)


@pytest.fixture(scope="module")
def tiny_variables(tiny_checkpoint, tiny_config):
  return convert.from_torch(tiny_checkpoint, tiny_config)


@pytest.fixture(scope="module")
def tiny_apply(tiny_config):
  model = build_model(tiny_config)
  return jax.jit(lambda variables, images: model.apply(variables, images, train=False))


# ---------------------------------------------------------------------------------------------------------------
# Structure.


@pytest.mark.parametrize("spec, expected", [
    ("configs/dem_w32_coco.py", 28_768_522),
    ("configs/dem_w48_coco.py", 64_084_362),
    ("configs/dem_w32_crowdpose.py", 28_761_685),
    ("configs/dem_w32_mpii.py", 28_763_931),
    (TINY, 708_610),
])
def test_parameter_count(spec, expected):
  assert _param_count(_abstract_model(spec)[1]) == expected


def test_parameter_count_crowdpose_w48():
  # CrowdPose heads on the W48 backbone (yaml crowd_pose/w48_640): the original's count.
  config = meme_jax.load_config("configs/dem_w32_crowdpose.py")
  w48 = meme_jax.load_config("configs/dem_w48_coco.py")
  for field in ("stage2", "stage3", "stage4", "deconv"):
    config.model[field] = w48.model[field]
  config.data.image_size = (64, 64)
  assert _param_count(convert.variable_shapes(config)) == 64_074_117


def test_stage1_sets_layer1():
  """`model.stage1` shapes layer1 as mmpose's `extra.stage1`; absent, it is the original's 4 Bottlenecks of 64."""
  config = meme_jax.load_config(TINY)
  config.data.image_size = (64, 64)
  config.model.stage1.num_blocks = (1,)
  model = build_model(config)
  params = jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x, train=False),
                          jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32))["params"]
  assert [k for k in params if k.startswith("layer1")] == ["layer1_0"]
  # Each dropped Bottleneck(64) of 256 channels in and out: 1x1 256->64, 3x3 64->64, 1x1 64->256, BN scale+bias.
  dropped = 256 * 64 + 9 * 64 * 64 + 64 * 256 + 2 * (64 + 64 + 256)
  assert _param_count({"params": {p: v.shape for p, v in _flatten(params).items()}}) == 708_610 - 3 * dropped

  config.model.stage1 = ml_collections.ConfigDict(dict(num_modules=1, num_blocks=(2,), num_channels=(16,),
                                                       block="basic"))
  layer1 = jax.eval_shape(lambda x: build_model(config).init(jax.random.PRNGKey(0), x, train=False),
                          jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32))["params"]["layer1_0"]
  assert layer1["conv1"]["kernel"].shape == (3, 3, 64, 16) and layer1["downsample_0"]["kernel"].shape[-1] == 16

  del config.model["stage1"]
  assert hrnet.HRNetSpec.from_config(config.model).stage1 == hrnet.StageSpec(1, (4,), (64,), "bottleneck")
  with pytest.raises(ValueError, match="one branch"):
    hrnet.HRNetSpec(config.model.stage2, config.model.stage3, config.model.stage4,
                    stage1=hrnet.StageSpec(1, (1, 1), (8, 16), "basic"))


@pytest.mark.parametrize("spec, shapes", [
    ("configs/dem_w32_coco.py", [(128, 128, 42), (256, 256, 42), (128, 128, 36), (256, 256, 18)]),
    ("configs/dem_w32_crowdpose.py", [(128, 128, 36), (256, 256, 36), (128, 128, 30), (256, 256, 15)]),
    ("configs/dem_w32_mpii.py", [(160, 160, 36), (320, 320, 36), (160, 160, 34), (320, 320, 17)]),
])
def test_output_shapes(spec, shapes):
  config = meme_jax.load_config(spec)
  outputs, _ = _abstract_model(spec)
  assert [tuple(o.shape) for o in outputs] == [(2,) + s for s in shapes]
  assert all(o.dtype == jnp.float32 for o in outputs)
  # The output sizes the targets are rendered at.
  assert [s[0] for s in shapes[:2]] == list(config.data.output_size)


def test_variables_match_original_state_dict_keys():
  """Every key of the original W32 state_dict has a variable of the right shape, and nothing else exists."""
  template = _abstract_model("configs/dem_w32_coco.py")[1]
  expected = {"params": {}, "batch_stats": {}}
  state_dict = {}
  with open(shared_path("spec", "dem_w32_512_state_dict.tsv")) as f:
    for line in f:
      key, shape_text = line.rstrip("\n").split("\t")
      if key.endswith("num_batches_tracked"):
        continue
      shape = tuple(int(s) for s in shape_text.split("x"))
      state_dict[key] = np.broadcast_to(np.float32(0), shape)   # a zero-cost stand-in tensor
      collection, path = convert.flax_location(key, len(shape))
      if len(shape) == 4:
        shape = tuple(shape[i] for i in (2, 3, 1, 0))
      assert path not in expected[collection], f"two keys map onto {path}"
      expected[collection][path] = shape
  assert len(expected["params"]) + len(expected["batch_stats"]) == 1976 - 328
  for collection in ("params", "batch_stats"):
    assert template[collection] == expected[collection]
  # The converter itself places every tensor (strict: nothing missing, unexpected or misshapen).
  placed = convert.match_state_dict(state_dict, template, strict=True)
  assert sum(len(v) for v in placed.values()) == len(state_dict)


# ---------------------------------------------------------------------------------------------------------------
# Parity with the original.


def test_tiny_reference_outputs(tiny_variables, tiny_apply, reference):
  """Converted original weights reproduce the original's float64 outputs to float32 accuracy.

  The reference was computed in float64; torch's own float32 run differs from it by `torch_f32_vs_f64_maxabs` per
  output. A float32 JAX run is another float32 evaluation of the same function, with rounding errors of the same
  size but in different places (other convolution algorithms, other summation orders), so its distance to the
  float64 result is of that order too: measured 1.15, 1.02, 0.80 and 0.80 times torch's error. 3x leaves room for
  other CPUs and XLA versions while still failing on any real difference (a wrong padding, resize rule or layer
  order changes outputs by 1e-2 or more).
  """
  images = reference["input_nchw"].transpose(0, 2, 3, 1)
  outputs = tiny_apply(tiny_variables, images)
  assert len(outputs) == 4
  for name, out, torch_error in zip(OUTPUT_NAMES, outputs, reference["torch_f32_vs_f64_maxabs"]):
    expected = reference[name].transpose(0, 2, 3, 1)
    assert out.shape == expected.shape, name
    error = float(np.max(np.abs(np.asarray(out) - expected)))
    assert error <= 3 * torch_error, f"{name}: max abs error {error:.3g} > 3 x {torch_error:.3g}"


def test_checkpoint_variants_convert(tmp_path, tiny_checkpoint, tiny_config, tiny_variables, tiny_apply, reference):
  """FP16-trained checkpoints (`1.` prefix, float16 convolutions, float32 BatchNorm) and DataParallel ones
  (`module.` prefix inside {'state_dict': ...}, plain .pth) convert without special cases."""
  import torch  # pylint: disable=import-outside-toplevel
  sd = torch_state_dict(tiny_checkpoint)
  fp16 = {"1." + k: (v.half() if v.ndim == 4 else v) for k, v in sd.items()}
  torch.save(fp16, tmp_path / "fp16.pth")
  torch.save({"epoch": 3, "state_dict": {"module." + k: v for k, v in sd.items()}}, tmp_path / "ddp.pth")

  ddp = convert.from_torch(str(tmp_path / "ddp.pth"), tiny_config)
  jax.tree_util.tree_map(np.testing.assert_array_equal, ddp, tiny_variables)

  half = convert.from_torch(str(tmp_path / "fp16.pth"), tiny_config)
  rounded = jax.tree_util.tree_map(
      lambda v: np.asarray(v).astype(np.float16).astype(np.float32) if np.ndim(v) == 4 else np.asarray(v),
      tiny_variables)
  jax.tree_util.tree_map(np.testing.assert_array_equal, half, rounded)
  assert all(np.asarray(v).dtype == np.float32 for v in jax.tree_util.tree_leaves(half))
  # float16 weights change the function by their rounding only: outputs stay near the reference.
  images = reference["input_nchw"].transpose(0, 2, 3, 1)
  for name, out in zip(OUTPUT_NAMES, tiny_apply(half, images)):
    expected = reference[name].transpose(0, 2, 3, 1)
    assert np.max(np.abs(np.asarray(out) - expected)) < 0.05 * np.max(np.abs(expected)), name


def test_mismatched_checkpoint_lists_keys(tiny_checkpoint):
  config = meme_jax.load_config("configs/dem_w32_coco.py")
  with pytest.raises(convert.CheckpointMismatchError) as info:
    convert.from_torch(tiny_checkpoint, config)
  message = str(info.value)
  with open(info.value.keys_file, encoding="utf-8") as f:
    every = f.read()
  assert tiny_checkpoint in message and "No config in configs/ builds exactly this model." in message
  assert "transition1.0.0.weight" in message                     # shape mismatch (8 vs 32 channels)
  assert "params/stage3_3/branches_0_0/conv1/kernel" in every     # missing: the tiny model has 1 stage-3 module
  assert "shape mismatches" in message and "missing variables" in message


# ---------------------------------------------------------------------------------------------------------------
# Mixed precision, training mode, initialisation.


def test_bfloat16_compute(tiny_config, tiny_variables, reference):
  config = meme_jax.load_config(TINY)
  config.model.dtype = "bfloat16"
  model = build_model(config)
  images = reference["input_nchw"].transpose(0, 2, 3, 1)
  outputs = jax.jit(lambda v, x: model.apply(v, x, train=False))(tiny_variables, images)
  for name, out in zip(OUTPUT_NAMES, outputs):
    assert out.dtype == jnp.float32
    expected = reference[name].transpose(0, 2, 3, 1).ravel()
    assert np.corrcoef(np.asarray(out).ravel(), expected)[0, 1] > 0.98, name
  params = jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x), jnp.zeros((1, 64, 64, 3)))["params"]
  assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(params))


def test_train_mode_uses_batch_statistics(tiny_config, tiny_variables, tiny_apply, reference):
  """train=True normalises with batch statistics and returns updated running statistics."""
  model = build_model(tiny_config)
  images = reference["input_nchw"].transpose(0, 2, 3, 1)
  outputs, updates = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))(
      tiny_variables, images)
  assert all(np.all(np.isfinite(o)) for o in outputs)
  assert not np.allclose(outputs[3], tiny_apply(tiny_variables, images)[3])
  assert jax.tree_util.tree_structure(updates["batch_stats"]) == jax.tree_util.tree_structure(
      tiny_variables["batch_stats"])
  old = tiny_variables["batch_stats"]["deconv_layers_ae_0_0_1"]["mean"]
  new = updates["batch_stats"]["deconv_layers_ae_0_0_1"]["mean"]
  assert not np.allclose(old, new)


class _InitProbe(nn.Module):
  """One of each initialised layer kind, made the way DEM makes them (small, so init compiles quickly)."""
  options: hrnet.LayerOptions

  @nn.compact
  def __call__(self, x):
    o = self.options
    a = o.conv(32, 3, 2, in_features=x.shape[-1], name="conv3x3")(x)
    b = o.conv(18, 1, in_features=x.shape[-1], use_bias=True, name="final")(x)
    c = o.conv_transpose(8, 4, name="deconv")(x)
    return a, b, c


def _probe_params(options, x):
  # An 'rbg' key: threefry random bits take many seconds to compile on CPU.
  return jax.jit(_InitProbe(options).init)(jax.random.key(0, impl="rbg"), x)["params"]


def test_initialisation_follows_torch_and_upstream():
  import torch  # pylint: disable=import-outside-toplevel
  x = jnp.zeros((1, 8, 8, 50))
  config = meme_jax.load_config(TINY)
  assert config.model.init == "normal"      # the default; 'torch' is what the released training script ran
  config.model.init = "torch"
  params = _probe_params(build_model(config).options, x)
  # PyTorch default init: U(-b, b) with b = 1/sqrt(fan_in), torch's fan-in rule (ConvTranspose: weight dim 1).
  for values, layer in ((params["conv3x3"]["kernel"], torch.nn.Conv2d(50, 32, 3)),
                        (params["final"]["bias"], torch.nn.Conv2d(50, 18, 1)),
                        (params["deconv"]["kernel"], torch.nn.ConvTranspose2d(50, 8, 4))):
    fan_in, _ = torch.nn.init._calculate_fan_in_and_fan_out(layer.weight)
    bound = 1.0 / np.sqrt(fan_in)
    assert np.max(np.abs(values)) <= bound
    assert np.max(np.abs(values)) > 0.8 * bound
  assert params["deconv"]["kernel"].shape == (4, 4, 8, 50)   # torch (50, 8, 4, 4) after OIHW -> HWIO

  config.model.init = "normal"
  params = _probe_params(build_model(config).options, x)
  for name in ("conv3x3", "deconv"):
    assert abs(float(np.std(params[name]["kernel"])) - 0.001) < 1e-4
  assert not np.any(params["final"]["bias"])


# ---------------------------------------------------------------------------------------------------------------
# Fuse up-sampling and the ImageNet backbone.


@pytest.mark.parametrize("factor", [2, 4, 8])
def test_fuse_upsampling_matches_torch(factor):
  import torch  # pylint: disable=import-outside-toplevel
  x = np.random.default_rng(factor).normal(size=(2, 5, 6, 3)).astype(np.float32)
  xt = torch.from_numpy(x.transpose(0, 3, 1, 2))
  size = (5 * factor, 6 * factor)
  bilinear = torch.nn.functional.interpolate(xt, size=size, mode="bilinear", align_corners=False)
  nearest = torch.nn.Upsample(scale_factor=factor, mode="nearest")(xt)
  np.testing.assert_allclose(hrnet.upsample_to(jnp.asarray(x), *size, "bilinear"),
                             bilinear.numpy().transpose(0, 2, 3, 1), atol=1e-6)
  np.testing.assert_array_equal(hrnet.upsample_to(jnp.asarray(x), *size, "nearest"),
                                nearest.numpy().transpose(0, 2, 3, 1))


def test_nearest_fuse_builds_same_variables(tiny_config, tiny_variables, tiny_apply, reference):
  config = meme_jax.load_config(TINY)
  config.model.fuse_upsample = "nearest"
  assert convert.variable_shapes(config) == convert.variable_shapes(tiny_config)
  images = reference["input_nchw"].transpose(0, 2, 3, 1)
  model = build_model(config)
  nearest = jax.jit(lambda v, x: model.apply(v, x, train=False))(tiny_variables, images)
  bilinear = tiny_apply(tiny_variables, images)
  # Same weights, other resize rule: a different function.
  assert np.max(np.abs(np.asarray(nearest[3]) - np.asarray(bilinear[3]))) > 1e-3


def test_imagenet_backbone_subset(tmp_path, tiny_checkpoint, tiny_config, tiny_variables):
  import torch  # pylint: disable=import-outside-toplevel
  sd = torch_state_dict(tiny_checkpoint)
  imagenet = fake_imagenet_hrnet(sd)
  subset = pretrained.hrnet_imagenet_backbone(imagenet)
  backbone_keys = {k for k in sd if not k.startswith(HRNET_HEAD_PREFIXES) and not k.endswith("num_batches_tracked")}
  assert set(subset) == backbone_keys
  assert "stage4.0.fuse_layers.1.0.0.0.weight" in subset   # earlier stage-4 modules keep every fuse layer

  torch.save({"module." + k: v for k, v in imagenet.items()}, tmp_path / "hrnet_imagenet.pth")
  loaded = pretrained.backbone_variables_from_torch(str(tmp_path / "hrnet_imagenet.pth"), tiny_config)
  flat = _flatten(loaded)
  flat_all = _flatten(tiny_variables)
  heads = ("stem1_", "stem2_", "final_layers_", "deconv_layers_")
  assert set(flat) == {p for p in flat_all if not p[1].startswith(heads)}
  for path, value in flat.items():
    np.testing.assert_array_equal(value, flat_all[path])

  # The standalone backbone has exactly these variables.
  spec = hrnet.HRNetSpec.from_config(tiny_config.model)
  backbone = hrnet.HigherHRNetBackbone(spec)
  shapes = jax.eval_shape(lambda x: backbone.init(jax.random.PRNGKey(0), x), jnp.zeros((1, 64, 64, 3)))
  assert {(c,) + p for c, t in shapes.items() for p in _flatten(t)} == set(flat)

  # Non-strict loading still rejects a backbone of another width.
  other = meme_jax.load_config(TINY)
  other.model.stage4.num_channels = (8, 16, 32, 48)
  with pytest.raises(convert.CheckpointMismatchError, match="transition3.3.0.0.weight"):
    pretrained.backbone_variables_from_torch(str(tmp_path / "hrnet_imagenet.pth"), other)


# ---------------------------------------------------------------------------------------------------------------
# Config facts the targets, losses and evaluation read.


def test_joint_groups_and_flip_indices():
  coco = meme_jax.load_config("configs/dem_w32_coco.py").data
  assert coco.flip_index == (0, 2, 1, 4, 3, 6, 5, 8, 7, 10, 9, 12, 11, 14, 13, 16, 15, 17)
  assert coco.num_offsets == 42 and coco.ljg_parents == (5, 6, 7, 8, 11, 12, 13, 14)
  # Flip test: joint g's offset group takes its mirror's channels; the original's channel layout gives 2 channels
  # per centre-only joint, 4 per limb joint, in joint order.
  starts = {0: 0, 1: 2, 2: 4, 3: 6, 4: 8, 7: 10, 8: 14, 9: 18, 10: 22, 13: 26, 14: 30, 15: 34, 16: 38}
  mirror = dict(zip((0, 1, 2, 3, 4, 7, 8, 9, 10, 13, 14, 15, 16), (0, 2, 1, 4, 3, 8, 7, 10, 9, 14, 13, 16, 15)))
  expected = []
  for joint in sorted(starts):
    size = 2 if joint < 5 else 4
    expected += list(range(starts[mirror[joint]], starts[mirror[joint]] + size))
  assert coco.offset_flip_index == tuple(expected)

  crowd = meme_jax.load_config("configs/dem_w32_crowdpose.py").data
  assert crowd.flip_index == (1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 12, 13, 14)
  assert crowd.num_offsets == 36

  mpii = meme_jax.load_config("configs/dem_w32_mpii.py").data
  assert np.argsort(mpii.joint_order).tolist() == [11, 9, 7, 6, 8, 10, 12, 13, 14, 15, 5, 3, 1, 0, 2, 4]  # BACK_ORDER
  assert mpii.num_joints == 16 and mpii.num_offsets == 36
  assert mpii.flip_index == (1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 12, 13, 14, 15, 16)
  assert mpii.rjg_tag == (0, 1, 6, 7, 12, 13) and mpii.ljg_center_only == (14, 15)


def test_config_recipe():
  coco = meme_jax.load_config("configs/dem_w32_coco.py")
  assert coco.data.image_size == (512, 512) and coco.data.output_size == (128, 256) and coco.data.sigma == 2
  assert coco.loss.offsets_loss_factor == (2.0, 2.0) and coco.loss.center_heatmap_weight == 5.0
  assert coco.test.scale_factors == (0.5, 0.75, 1.0, 1.5, 2.0)
  assert coco.train.lr_steps == (200, 260) and coco.train.num_epochs == 300 and coco.train.batch_size == 12
  for spec in ("configs/dem_w48_coco.py", "configs/dem_w32_crowdpose.py", "configs/dem_w32_mpii.py"):
    config = meme_jax.load_config(spec)
    assert config.loss.offsets_loss_factor == (1.0, 1.0), spec
    assert config.test.scale_factors == (0.5, 1.0, 2.0), spec
  synthetic = meme_jax.load_config("configs/dem_w32_coco.py:synthetic")
  assert synthetic.data.dataset == "synthetic" and synthetic.data.image_size == (128, 128)
  assert synthetic.model.stage4.num_channels == (16, 32, 64, 128) and synthetic.model.stage1.num_blocks == (1,)
  with pytest.raises(ValueError, match="unknown config argument"):
    meme_jax.load_config("configs/dem_w32_coco.py:w64")


def test_inconsistent_offset_count_is_rejected():
  config = meme_jax.load_config(TINY)
  config.model.num_offsets = 40
  with pytest.raises(ValueError, match="num_offsets"):
    build_model(config)

