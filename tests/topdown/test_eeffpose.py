"""EEffPose network: structure, parameter counts, checkpoint conversion, numerical parity and pretrained mapping.

Truth comes from outside this code base: the parameter counts (every ablation variant) and state_dict key lists
(spec/*.tsv) measured on the original PyTorch model, a checkpoint of the original P0 with the outputs it computed in
float64 (reference/eeffpose_p0_coco), and the checkpoint variants (FP16 `1.` prefix, `module.`, wrappers) built here
with torch exactly as the original code writes them.
"""
import functools
import os
import re
import subprocess
import sys
import tempfile

from flax import traverse_util
import jax
import jax.numpy as jnp
from jax.extend import core as jax_core
import numpy as np
import pytest
import torch

import meme_jax
from meme_jax import convert, pretrained
from meme_jax.models import build_model
from meme_jax.models import fusion
from conftest import REPO_ROOT, shared_path
from original_checkpoints import fake_efficientnet_backbone, read_tsv

pytestmark = pytest.mark.xdist_group("eeffpose")

P0, P2 = "configs/eeffpose_p0.py", "configs/eeffpose_p2.py"
P0_MPII, P2_MPII = "configs/eeffpose_p0_mpii.py", "configs/eeffpose_p2_mpii.py"
REFERENCE_DIR = ("reference", "eeffpose_p0_coco")
TOLERANCE = 1e-4
# Low LLVM optimisation compiles the big graphs several times faster on CPU; numerics are unchanged.
FAST_COMPILE = {"xla_backend_optimization_level": 0}

# The original's ablation variants [abc] = backbone 'Ours', neck 'Ours', head 'Ours'.
ABLATIONS = {
    "000": dict(backbone="efficientnet", neck="bifpn", head="sum"),
    "001": dict(backbone="efficientnet", neck="bifpn", head="attention"),
    "010": dict(backbone="efficientnet", neck="tfneck", head="sum"),
    "011": dict(backbone="efficientnet", neck="tfneck", head="attention"),
    "100": dict(backbone="eeffnet", neck="bifpn", head="sum"),
    "101": dict(backbone="eeffnet", neck="bifpn", head="attention"),
    "110": dict(backbone="eeffnet", neck="tfneck", head="sum"),
    "111": dict(backbone="eeffnet", neck="tfneck", head="attention"),
}


@pytest.fixture(autouse=True)
def _mismatch_key_files_in_tmp_path(tmp_path, monkeypatch):
  """Checkpoint-mismatch errors write their key lists to the temporary directory: this test's, not the system's."""
  monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))


def _config(spec=P0, **model):
  config = meme_jax.load_config(spec)
  config.model.update(model)
  return config


def _flatten(tree):
  """{path tuple: leaf} of a nested dict of arrays."""
  return traverse_util.flatten_dict(tree)


def _flat_variables(variables):
  return {(col,) + path: v for col, tree in variables.items() for path, v in _flatten(tree).items()}


@functools.lru_cache(maxsize=None)
def _shapes(spec, items=()):
  """{collection: {path: shape}} of a config's model, traced with jax.eval_shape (no allocation)."""
  return convert.variable_shapes(_config(spec, **dict(items)))


def _param_count(shapes, top=None):
  return sum(int(np.prod(s)) for path, s in shapes["params"].items() if top is None or path[0].startswith(top))


def _flax_entry(key, shape):
  collection, path = convert.flax_location(key, len(shape))
  return (collection,) + path, convert.torch_to_flax_array(key, np.zeros(shape, np.float32)).shape


def _random_like(shapes, seed=0):
  """Random values for {collection: {path: shape}}, made on the host (initialising under jit compiles slowly on
  CPU): kernels ~ N(0, 1/fan_in), BN scales and variances around 1, fusion weights in [0, 1)."""
  rng = np.random.default_rng(seed)
  out = {}
  for col, tree in shapes.items():
    flat = {}
    for path, shape in tree.items():
      leaf = path[-1]
      if leaf == "kernel":
        value = rng.standard_normal(shape) / np.sqrt(np.prod(shape[:-1]))
      elif leaf in ("scale", "var"):
        value = rng.uniform(0.5, 1.5, shape)
      elif leaf in ("weights", "edge_weights"):
        value = rng.uniform(0.0, 1.0, shape)
      else:
        value = 0.1 * rng.standard_normal(shape)
      flat[path] = value.astype(np.float32)
    out[col] = traverse_util.unflatten_dict(flat)
  return out


def _init_module(module, *args):
  shapes = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), *args))
  return _random_like({col: {p: v.shape for p, v in _flatten(tree).items()} for col, tree in shapes.items()})


def _compile(fn, *args):
  return jax.jit(fn).lower(*args).compile(FAST_COMPILE)


# ---------------------------------------------------------------------------------------------------------------
# Module-scope fixtures: the reference, its conversion and one compiled P0 per mode.


@pytest.fixture(scope="module")
def reference_io():
  data = np.load(shared_path(*REFERENCE_DIR, "io.npz"))
  nhwc = lambda a: np.transpose(a, (0, 2, 3, 1))  # noqa: E731
  return {"input": nhwc(data["input_nchw"]), "eval": nhwc(data["output_eval_f64"]),
          "train_bn": nhwc(data["output_train_bn_f64"])}


@pytest.fixture(scope="module")
def reference_path():
  return shared_path(*REFERENCE_DIR, "model_best.pth.xz")


@pytest.fixture(scope="module")
def raw_state_dict(reference_path):
  """The reference checkpoint as the original saved it (num_batches_tracked included)."""
  return convert.read_torch_file(reference_path)


@pytest.fixture(scope="module")
def plain_checkpoint(raw_state_dict, tmp_path_factory):
  """The reference re-saved uncompressed (faster to read in the tests that convert it again)."""
  path = tmp_path_factory.mktemp("plain") / "model_best.pth"
  torch.save(raw_state_dict, path)
  return str(path)


@pytest.fixture(scope="module")
def reference_variables(reference_path):
  return convert.from_torch(reference_path, _config())


@pytest.fixture(scope="module")
def p0_eval(reference_io):
  """The compiled eval-mode P0 forward on the reference input: variables -> NHWC heatmaps."""
  model = build_model(_config())
  x = jnp.asarray(reference_io["input"])
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x))
  compiled = _compile(lambda v, x: model.apply(v, x, train=False), shapes, x)
  return lambda variables: np.asarray(compiled(variables, x))


@pytest.fixture(scope="module")
def reference_eval_output(p0_eval, reference_variables):
  return p0_eval(reference_variables)


# ---------------------------------------------------------------------------------------------------------------
# Structure.


@pytest.mark.parametrize("spec,model,expected", [
    (P0, {}, 9_007_292),
    (P2, {}, 16_759_630),
    (P0_MPII, {}, 9_007_094),
    (P2_MPII, {}, 16_759_288),
    (P0, {"fuse_dense": False}, 6_017_266),
] + [(P0, ABLATIONS[name], count) for name, count in (
    ("000", 3_797_279), ("001", 3_797_279), ("010", 4_380_786), ("011", 4_380_786),
    ("100", 8_423_785), ("101", 8_423_785), ("110", 9_007_292), ("111", 9_007_292))])
def test_parameter_count_equals_original(spec, model, expected):
  assert _param_count(_shapes(spec, tuple(sorted(model.items())))) == expected


@pytest.mark.parametrize("spec,backbone,neck,head", [
    (P0, 8_221_894, 782_032, 3_366), (P2, 13_384_548, 3_369_268, 5_814)])
def test_parameter_breakdown_equals_original(spec, backbone, neck, head):
  shapes = _shapes(spec)
  assert _param_count(shapes, "hr_backbone") == backbone
  assert _param_count(shapes, "fpn") == neck
  assert _param_count(shapes, "final_layer") == head


def test_recurrent_variant_shares_copied_blocks():
  shapes = _shapes(P0, (("recurrent", True),))
  assert _param_count(shapes) == 7_620_242
  # The copied positions hold nothing of their own; the stage-2 and stage-4 sources still exist.
  assert not any(p[0] == "hr_backbone_6" and p[1].startswith("branches_0_") for p in shapes["params"])
  assert ("hr_backbone_5", "branches_0_1", "conv_pw", "kernel") in shapes["params"]
  assert ("hr_backbone_7", "branches_1_2", "conv_pw", "kernel") in shapes["params"]


@pytest.mark.parametrize("spec,tsv", [(P0, "eeffpose_p0_state_dict.tsv"), (P2, "eeffpose_p2_state_dict.tsv")])
def test_variable_tree_mirrors_original_state_dict(spec, tsv):
  expected = dict(_flax_entry(key, shape) for key, shape in read_tsv(tsv))
  actual = {(col,) + path: tuple(shape) for col, tree in _shapes(spec).items() for path, shape in tree.items()}
  assert sorted(set(expected) - set(actual)) == []
  assert sorted(set(actual) - set(expected)) == []
  assert {k: v for k, v in actual.items() if expected[k] != v} == {}


def test_bifpn_variables_use_effdet_names():
  """Keys of effdet's BiFPN (tf_efficientdet_d0: 3 cells, 64 channels, P3-P5 from the backbone)."""
  params = _shapes(P0, tuple(sorted(ABLATIONS["101"].items())))["params"]
  expected = {
      ("fpn", "resample_3", "conv", "conv", "kernel"): (1, 1, 320, 64),
      ("fpn", "resample_3", "conv", "conv", "bias"): (64,),
      ("fpn", "resample_3", "conv", "bn", "scale"): (64,),
      ("fpn", "cell_0", "fnode_0", "combine", "edge_weights"): (2,),
      ("fpn", "cell_0", "fnode_4", "combine", "edge_weights"): (3,),
      ("fpn", "cell_0", "fnode_1", "combine", "resample_2", "conv", "conv", "kernel"): (1, 1, 320, 64),
      ("fpn", "cell_0", "fnode_3", "combine", "resample_0", "conv", "conv", "kernel"): (1, 1, 40, 64),
      ("fpn", "cell_0", "fnode_4", "combine", "resample_1", "conv", "bn", "bias"): (64,),
      ("fpn", "cell_2", "fnode_7", "after_combine", "conv", "conv_dw", "kernel"): (3, 3, 1, 64),
      ("fpn", "cell_2", "fnode_7", "after_combine", "conv", "conv_pw", "bias"): (64,),
      ("final_layer", "layers_4_0", "kernel"): (1, 1, 64, 17),
  }
  assert {k: params.get(k) for k in expected} == expected
  # Inputs that already have 64 channels (P6, P7, nodes, every input of later cells) are not projected.
  assert not any(p[:2] == ("fpn", "resample_4") for p in params)
  assert not any(p[1] == "cell_1" and "resample_" in "/".join(p[3:]) for p in params)
  assert sum(1 for p in params if p[-1] == "edge_weights") == 3 * 8


def test_copied_branches_take_drop_rates_of_the_new_stage():
  """As the original: copies of stage2[-1] in HRB 6 get stage 3's rates, fuse layers the last block's."""
  model = build_model(_config())
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3))))
  bound = model.bind(shapes)
  hrb6, hrb9 = bound.hr_backbone[6], bound.hr_backbone[9]
  rates = [block.spec.drop_path_rate for block in hrb6.branches[0]]
  np.testing.assert_allclose(rates, [0.2 * 5 / 16, 0.2 * 6 / 16, 0.2 * 7 / 16])
  assert [b.spec.drop_path_rate for b in hrb6.branches[1]] == rates
  assert hrb9.branches[1][0].spec.drop_path_rate == pytest.approx(0.2 * 15 / 16)
  assert hrb9.fuse_layers.drop_path_rates == pytest.approx((0.2 * 15 / 16,) * 3)
  assert bound.fpn[2].drop_path_rates == (0.2, 0.2, 0.2)


def test_config_is_validated():
  for field, value in (("backbone", "resnet"), ("neck", "fpn"), ("head", "max"), ("efficientnet", "b3"),
                       ("dtype", "int8"), ("depthwise_impl", "fft")):
    with pytest.raises(ValueError, match=f"config.model.{field}"):
      build_model(_config(**{field: value}))
  config = _config()
  del config.train.bn_group_size
  assert build_model(config).bn_group_size == 0
  assert build_model(_config()).bn_group_size == 16


def test_align_corners_matrix_matches_torch():
  x = torch.arange(2 * 3 * 4 * 3, dtype=torch.float64).reshape(2, 3, 4, 3) ** 1.5
  expected = torch.nn.Upsample(scale_factor=4, mode="bilinear", align_corners=True)(x).numpy()
  out = fusion.upsample_bilinear_align_corners(jnp.asarray(x.numpy().transpose(0, 2, 3, 1), jnp.float32), 4)
  np.testing.assert_allclose(np.asarray(out).transpose(0, 3, 1, 2), expected, rtol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# Parity with the original.


def test_eval_output_matches_reference(reference_eval_output, reference_io):
  error = np.abs(reference_eval_output - reference_io["eval"]).max()
  assert reference_eval_output.shape == (2, 64, 48, 17) and reference_eval_output.dtype == np.float32
  assert error < TOLERANCE, f"max-abs error {error:.3g} against the original's float64 output"


def test_batch_statistics_output_matches_reference(reference_variables, reference_io):
  model = build_model(_config())
  x = jnp.asarray(reference_io["input"])
  forward = lambda v, x: model.apply(v, x, train=True, drop_path=False, mutable=["batch_stats"])  # noqa: E731
  output, updates = _compile(forward, reference_variables, x)(reference_variables, x)
  error = np.abs(np.asarray(output) - reference_io["train_bn"]).max()
  assert error < TOLERANCE, f"max-abs error {error:.3g} against the original's batch-statistics output"
  # Running statistics moved towards the batch statistics (momentum 0.9 for the stem BN).
  old = reference_variables["batch_stats"]["hr_backbone_1"]["mean"]
  new = np.asarray(updates["batch_stats"]["hr_backbone_1"]["mean"])
  assert not np.allclose(new, old)


def _checkpoint_variants(raw):
  """The original's other checkpoint formats, made from the reference state_dict with torch."""
  bn_modules = {k.rsplit(".", 1)[0] for k in raw if k.endswith("running_mean")}
  # network_to_half: every parameter except BatchNorm's is float16, and keys gain the Sequential's `1.`.
  fp16 = {f"1.{k}": (v if k.rsplit(".", 1)[0] in bn_modules or not v.is_floating_point() else v.half())
          for k, v in raw.items()}
  return {
      "fp16": fp16,
      "module": {f"module.{k}": v for k, v in raw.items()},
      "wrapper": {"state_dict": dict(raw), "epoch": 7, "perf": 0.5, "optimizer": {"state": {}}},
      "no_num_batches_tracked": {k: v for k, v in raw.items() if not k.endswith("num_batches_tracked")},
  }


def test_checkpoint_variants_convert_alike(raw_state_dict, reference_variables, p0_eval, reference_io,
                                           reference_eval_output, tmp_path):
  reference = _flat_variables(reference_variables)
  for name, content in _checkpoint_variants(raw_state_dict).items():
    path = tmp_path / f"{name}.pth"
    torch.save(content, path)
    variables = convert.from_torch(str(path), _config())
    flat = _flat_variables(variables)
    assert flat.keys() == reference.keys(), name
    if name != "fp16":
      assert all(np.array_equal(flat[k], reference[k]) for k in reference), name
      continue
    assert all(flat[k].dtype == np.float32 for k in flat)
    for k in reference:
      np.testing.assert_allclose(flat[k], reference[k], rtol=1e-3, atol=1e-4, err_msg=str(k))
    output = p0_eval(variables)
    # float16 weights: relative rounding 2^-11 per weight, amplified through the network.
    assert np.abs(output - reference_eval_output).max() < 5e-3
    assert np.abs(output - reference_io["eval"]).max() < 5e-3


def test_recurrent_checkpoint_with_aliased_tensors(raw_state_dict, p0_eval, reference_io, reference_eval_output,
                                                   tmp_path):
  """A BACKBONE_REC state_dict lists every copied position as an alias of the stage-2/stage-4 block tensors."""
  sd = {k: v.clone() for k, v in raw_state_dict.items()}
  sources = {0: "hr_backbone.5.branches.0.1.", 1: "hr_backbone.7.branches.1.2."}
  aliased = 0
  for key in list(sd):
    m = re.match(r"hr_backbone\.([6-9])\.branches\.([01])\.(\d+)\.(.+)$", key)
    if m and not (m.group(1) in "67" and m.group(2) == "1"):
      sd[key] = sd[sources[int(m.group(2))] + m.group(4)]   # the very same tensor object
      aliased += 1
  assert aliased == 16 * 22   # 16 copied blocks x (19 float tensors + 3 BatchNorm counters)
  path = tmp_path / "recurrent.pth"
  torch.save(sd, path)
  variables = convert.from_torch(str(path), _config(recurrent=True))
  count = sum(int(np.prod(v.shape)) for v in _flatten(variables["params"]).values())
  assert count == 7_620_242
  # Non-shared, the same file has the copies' weights equal to their sources: the same function.
  untied = convert.from_torch(str(path), _config())
  model = build_model(_config(recurrent=True))
  x = jnp.asarray(reference_io["input"])
  recurrent_out = _compile(lambda v, x: model.apply(v, x), variables, x)(variables, x)
  np.testing.assert_allclose(np.asarray(recurrent_out), p0_eval(untied), atol=1e-6)
  # ... and differs from the model whose copies keep their own weights.
  assert np.abs(np.asarray(recurrent_out) - reference_eval_output).max() > 1e-3


# ---------------------------------------------------------------------------------------------------------------
# Bad checkpoints.


def test_mismatched_config_lists_every_offending_key():
  p0_rows = [(_flax_entry(k, s), k) for k, s in read_tsv("eeffpose_p0_state_dict.tsv")]
  p2 = dict(_flax_entry(k, s) for k, s in read_tsv("eeffpose_p2_state_dict.tsv"))
  wrong_shape = [key for (loc, shape), key in p0_rows if loc in p2 and p2[loc] != shape]
  unexpected = [key for (loc, _), key in p0_rows if loc not in p2]
  provided = {loc for (loc, shape), _ in p0_rows if p2.get(loc) == shape}
  # Variables the file does not provide with the right shape (mis-shaped ones count as missing too).
  missing = ["/".join(loc) for loc in p2 if loc not in provided]
  assert wrong_shape and missing and len(missing) > len(wrong_shape)

  with pytest.raises(convert.CheckpointMismatchError) as info:
    convert.from_torch(shared_path(*REFERENCE_DIR, "model_best.pth.xz"), _config(P2))
  message = str(info.value)
  assert "config 'eeffpose_p2'" in message
  assert "P0 (EfficientNet-B0)" in message and "17 joints" in message and "9,007,292 parameters" in message
  assert "It fits the model of configs/eeffpose_p0.py." in message
  # The message counts each kind and shows a few; the file it names lists every one.
  with open(info.value.keys_file, encoding="utf-8") as f:
    every = f.read()
  assert f"Every key: {info.value.keys_file}" in message and len(message.splitlines()) < 30
  for text in (message, every):
    lines = {line.strip() for line in text.splitlines()}
    assert f"shape mismatches ({len(wrong_shape)}):" in lines
    assert f"missing variables ({len(missing)}):" in lines
    assert (f"unexpected keys ({len(unexpected)}):" in lines) == bool(unexpected)
  listed = {line.strip().split(" ")[0].rstrip(":") for line in every.splitlines()}
  absent = [k for k in wrong_shape + unexpected + missing if k not in listed]
  assert absent == []


def test_checkpoint_of_another_family_is_told_briefly_with_every_key_in_a_file():
  # A DEM HRNet-W32 checkpoint (the original's keys and shapes) given to the EEffPose-P0 config.
  state_dict = {}
  with open(shared_path("spec", "dem_w32_512_state_dict.tsv")) as f:
    for line in f:
      key, shape = line.rstrip("\n").split("\t")
      if not key.endswith("num_batches_tracked"):
        state_dict[key] = np.zeros([int(n) for n in shape.split("x")], np.float32)
  p0 = dict(_flax_entry(k, s) for k, s in read_tsv("eeffpose_p0_state_dict.tsv"))
  placed = {loc for key, v in state_dict.items() for loc, shape in [_flax_entry(key, v.shape)] if p0.get(loc) == shape}
  unexpected = [k for k, v in state_dict.items() if _flax_entry(k, v.shape)[0] not in p0]
  missing = [loc for loc in p0 if loc not in placed]
  with pytest.raises(convert.CheckpointMismatchError) as info:
    convert.variables_from_state_dict(state_dict, _config(), source="dem_w32_coco.pth")
  message = str(info.value)
  with open(info.value.keys_file, encoding="utf-8") as f:
    every = f.read()
  assert len(message.splitlines()) < 30, message
  assert "dem_w32_coco.pth does not fit the model built by config 'eeffpose_p0'" in message
  assert "DEM (double embedding), HRNet-W32, 17 joints + centre" in message
  assert "It fits the model of configs/dem_w32_coco.py." in message
  assert f"unexpected keys ({len(unexpected)}):" in message and f"missing variables ({len(missing)}):" in message
  assert f"... and {len(unexpected) - 5} more" in message
  shown = [line.strip().split(" ")[0] for line in message.split("unexpected keys")[1].splitlines()[1:6]]
  assert shown == unexpected[:5]
  assert f"Every key: {info.value.keys_file}" in message
  listed = {line.strip().split(" ")[0] for line in every.splitlines()}
  assert set(unexpected) <= listed and {"/".join(loc) for loc in missing} <= listed


def test_damaged_checkpoint_lists_every_offending_key(raw_state_dict, tmp_path):
  sd = dict(raw_state_dict)
  removed = "hr_backbone.9.fuse_layers.mixup_layers.2.se.conv_expand.bias"
  renamed = "fpn.1.addup_layers.0.weights"
  reshaped = "final_layer.layers.1.0.weight"
  del sd[removed]
  sd[renamed.replace("addup", "add_up")] = sd.pop(renamed)
  sd[reshaped] = sd[reshaped].reshape(17, 64)
  path = tmp_path / "damaged.pth"
  torch.save(sd, path)
  with pytest.raises(convert.CheckpointMismatchError) as info:
    convert.from_torch(str(path), _config())
  message = str(info.value)
  assert str(path) in message and "EEffPose" in message
  assert "unexpected keys (1):" in message and "fpn.1.add_up_layers.0.weights (1, 64, 3, 1, 1)" in message
  assert "shape mismatches (1):" in message and f"{reshaped}: checkpoint (17, 64)" in message
  assert "missing variables (3):" in message   # the removed, the renamed and the mis-shaped one
  assert "params/hr_backbone_9/fuse_layers/mixup_layers_2/se/conv_expand/bias (1920,)" in message
  assert "params/fpn_1/addup_layers_0/weights (64, 3)" in message
  assert "params/final_layer/layers_1_0/kernel (1, 1, 64, 17)" in message


def test_corrupted_files_raise_mismatch_error(plain_checkpoint, reference_path, tmp_path):
  with open(plain_checkpoint, "rb") as f:
    data = f.read()
  truncated = tmp_path / "truncated.pth"
  truncated.write_bytes(data[: len(data) // 2])
  with open(reference_path, "rb") as f:
    xz = f.read()
  broken_xz = tmp_path / "broken.pth.xz"
  broken_xz.write_bytes(xz[:1000])
  garbage = tmp_path / "garbage.pth"
  garbage.write_bytes(b"not a checkpoint at all" * 10)
  for path in (truncated, broken_xz, garbage):
    with pytest.raises(convert.CheckpointMismatchError, match=re.escape(str(path))):
      convert.from_torch(str(path), _config())


def test_converter_command_line(plain_checkpoint, reference_variables, tmp_path):
  output = tmp_path / "orbax"
  env = dict(os.environ, PYTHONPATH=REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
             JAX_PLATFORMS="cpu")
  result = subprocess.run([sys.executable, "-m", "meme_jax.convert", plain_checkpoint, "--config", P0,
                           "--output", str(output)], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=300, check=False)
  assert result.returncode == 0, result.stderr
  assert "9,007,292 parameters" in result.stdout
  restored = _flat_variables(convert.load_variables(str(output)))
  reference = _flat_variables(reference_variables)
  assert restored.keys() == reference.keys()
  assert all(np.array_equal(np.asarray(restored[k]), reference[k]) for k in reference)
  # A checkpoint that does not fit: exit status 2 and the offending keys on stderr.
  result = subprocess.run([sys.executable, "-m", "meme_jax.convert", plain_checkpoint, "--config", P2,
                           "--output", str(tmp_path / "no")], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=300, check=False)
  assert result.returncode == 2, result.stderr
  assert not (tmp_path / "no").exists()


# ---------------------------------------------------------------------------------------------------------------
# Variants and training-mode behaviour.


# [000] covers the plain backbone, the BiFPN and the sum head; [101] the BiFPN behind the HRB backbone (the TFNeck
# and the attention head behind it are checked against the reference above).
@pytest.mark.parametrize("name", ["000", "101"])
def test_ablation_variant_runs(name):
  config = _config(**ABLATIONS[name])
  model = build_model(config)
  variables = _random_like(_shapes(P0, tuple(sorted(ABLATIONS[name].items()))))
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 64, 64, 3))
  out = _compile(lambda v, x: model.apply(v, x), variables, x)(variables, x)
  out = np.asarray(out)
  assert out.shape == (2, 16, 16, 17) and out.dtype == np.float32 and np.isfinite(out).all()
  if ABLATIONS[name]["head"] == "attention":
    assert (out > 0).all() and (out < 1).all()
  assert out.std() > 0


def test_bifpn_rejects_sizes_that_do_not_halve():
  model = build_model(_config(**ABLATIONS["001"]))
  with pytest.raises(ValueError, match="halve exactly"):
    jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 384, 288, 3))))


def test_mbblock_drop_path_zeroes_whole_samples_without_residual():
  """As the original, whose fusion MBBlock has no skip yet keeps drop path: it zeroes its whole output per sample
  and rescales survivors."""
  cell = fusion.TotalFusion((8, 16), (8, 16), (0.5, 0.5))
  inputs = [jax.random.normal(jax.random.PRNGKey(1), (16, 8, 8, 8)),
            jax.random.normal(jax.random.PRNGKey(2), (16, 4, 4, 16))]
  variables = _init_module(cell, inputs)

  def both(variables, inputs):
    full, _ = cell.apply(variables, inputs, train=True, drop_path=False, mutable=["batch_stats"])
    dropped, _ = cell.apply(variables, inputs, train=True, mutable=["batch_stats"],
                            rngs={"dropout": jax.random.PRNGKey(3)})
    return full, dropped
  full, dropped = _compile(both, variables, inputs)(variables, inputs)
  for rank in range(2):
    # in == out channels: the fixup layer is the identity, so output - input is the MBBlock branch.
    mixed = np.asarray(full[rank] - inputs[rank])
    branch = np.asarray(dropped[rank] - inputs[rank])
    kept = np.array([np.allclose(b, m / 0.5, atol=1e-5) for b, m in zip(branch, mixed)])
    zeroed = np.array([np.allclose(b, 0.0, atol=1e-6) for b in branch])
    assert (kept ^ zeroed).all()
    assert 0 < kept.sum() < len(kept)


def test_bfloat16_compute_keeps_float32_parameters_and_output():
  # XLA's convolution for the depthwise layers too, so that every conv shows up as one conv_general_dilated.
  config = _config(dtype="bfloat16", depthwise_impl="conv")
  model = build_model(config)
  x = jnp.zeros((2, 64, 64, 3), jnp.float32)
  variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x))
  assert {v.dtype for v in jax.tree_util.tree_leaves(variables)} == {jnp.dtype(jnp.float32)}
  out, updates = jax.eval_shape(
      lambda v: model.apply(v, x, train=True, mutable=["batch_stats"], rngs={"dropout": jax.random.PRNGKey(1)}),
      variables)
  assert out.dtype == jnp.float32 and out.shape == (2, 16, 16, 17)
  assert {v.dtype for v in jax.tree_util.tree_leaves(updates)} == {jnp.dtype(jnp.float32)}
  # Every convolution outside the (float32) head computes in bfloat16.
  jaxpr = jax.make_jaxpr(lambda v: model.apply(v, x))(variables)
  conv_dtypes = []

  def visit(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == "conv_general_dilated":
        conv_dtypes.append(eqn.invars[0].aval.dtype)
      for sub in jax_core.jaxprs_in_params(eqn.params):
        visit(sub)
  visit(jaxpr.jaxpr)
  num_convs = sum(1 for key, shape in read_tsv("eeffpose_p0_state_dict.tsv")
                  if key.endswith(".weight") and len(shape) == 4)
  assert len(conv_dtypes) == num_convs
  assert conv_dtypes.count(jnp.dtype(jnp.float32)) == 3   # the head's three 1x1 convs


def test_bfloat16_fusion_cell_stays_close_to_float32():
  inputs = [jax.random.normal(jax.random.PRNGKey(i), (2, 16 >> i, 16 >> i, c)) for i, c in enumerate((8, 16, 24))]
  cell32 = fusion.TotalFusion((8, 16, 24), (16, 16, 16), (0.2,) * 3)
  cell16 = fusion.TotalFusion((8, 16, 24), (16, 16, 16), (0.2,) * 3, dtype=jnp.bfloat16)
  variables = _init_module(cell32, inputs)
  forward = lambda v, x: (cell32.apply(v, x), cell16.apply(v, [i.astype(jnp.bfloat16) for i in x]))  # noqa: E731
  outputs = _compile(forward, variables, inputs)(variables, inputs)
  for a, b in zip(*outputs):
    assert b.dtype == jnp.bfloat16
    assert np.abs(np.asarray(b, np.float32) - np.asarray(a)).max() < 0.05 * np.abs(np.asarray(a)).max()


# ---------------------------------------------------------------------------------------------------------------
# Pretrained backbone initialisation.


def _changed_leaves(before, after):
  a, b = _flat_variables(before), _flat_variables(after)
  assert a.keys() == b.keys()
  return {k for k in a if not np.array_equal(np.asarray(a[k]), np.asarray(b[k]))}


def _torch_key_location(key, tensor):
  collection, path = convert.flax_location(key, tensor.ndim)
  return (collection,) + path


def test_efficientdet_backbone_lands_on_stem_and_original_stages(reference_variables, tmp_path):
  config = _config()
  backbone = fake_efficientnet_backbone(seed=1)
  effdet = {f"backbone.{k}": v for k, v in backbone.items()}
  effdet["backbone.bn1.num_batches_tracked"] = torch.tensor(5)
  effdet["fpn.cell.0.fnode.0.combine.edge_weights"] = torch.ones(2)
  effdet["box_net.predict.conv_pw.weight"] = torch.ones(36, 64, 1, 1)
  effdet["class_net.predict.conv_pw.bias"] = torch.ones(810)
  mapped = pretrained.efficientdet_backbone_state_dict(effdet, config)
  assert len(mapped) == 304 and all(v.is_floating_point() for v in mapped.values())

  path = tmp_path / "tf_efficientdet_d0_ap.pth"
  torch.save(effdet, path)
  config.init.backbone = str(path)
  merged = pretrained.init_pretrained(reference_variables, config)
  changed = _changed_leaves(reference_variables, merged)
  assert len(changed) == 304
  flat = _flat_variables(merged)
  for key, tensor in backbone.items():
    if key.startswith("blocks."):
      s, rest = key.split(".")[1], key.split(".", 2)[2]
      branch = {"0": 0, "1": 0, "2": 0, "3": 1, "4": 1, "5": 2, "6": 2}[s]
      target = f"hr_backbone.{int(s) + 3}.branches.{branch}.{rest}"
    else:
      target = key.replace("conv_stem.", "hr_backbone.0.").replace("bn1.", "hr_backbone.1.")
    location = _torch_key_location(target, tensor)
    assert location in changed, target
    np.testing.assert_array_equal(flat[location], convert.torch_to_flax_array(target, tensor.numpy()))
  # The copies, fuse layers, neck and head keep their values.
  assert not any(p[1] in ("fpn_0", "final_layer") or (p[1] == "hr_backbone_6" and p[2] == "branches_0_0")
                 or "fuse_layers" in p for p in changed)


def test_imagenet_weights_land_on_the_copied_branches(reference_variables, tmp_path):
  config = _config()
  imagenet = fake_efficientnet_backbone(seed=2)
  imagenet.update({"conv_head.weight": torch.ones(1280, 320, 1, 1), "bn2.weight": torch.ones(1280),
                   "classifier.weight": torch.ones(1000, 1280), "classifier.bias": torch.ones(1000)})
  copies = pretrained.imagenet_state_dict(imagenet, config, copies_only=True)
  assert len(copies) == 16 * 19
  path = tmp_path / "tf_efficientnet_b0_aa.pth"
  torch.save(imagenet, path)
  config.init.backbone_copies = str(path)
  merged = pretrained.init_pretrained(reference_variables, config)
  flat = _flat_variables(merged)
  expected = set()
  for hrb, blocks in ((6, 3), (7, 3), (8, 4), (9, 1)):
    for j in range(blocks):
      for branch, source in ((0, "blocks.2.1."), (1, "blocks.4.2.")):
        if branch == 1 and hrb < 8:
          continue
        for key, tensor in imagenet.items():
          if key.startswith(source):
            target = f"hr_backbone.{hrb}.branches.{branch}.{j}.{key[len(source):]}"
            location = _torch_key_location(target, tensor)
            expected.add(location)
            np.testing.assert_array_equal(flat[location], convert.torch_to_flax_array(target, tensor.numpy()))
  assert len(expected) == 304

  # Without an EfficientDet file, timm's weights also initialise the stem and every stage, as timm does.
  stages_too = _changed_leaves(reference_variables, merged)
  assert len(stages_too) == 608 and expected < stages_too
  # With one, the copies keep the ImageNet weights and EfficientDet wins on the stem and stages.
  effdet = {f"backbone.{k}": v for k, v in fake_efficientnet_backbone(seed=1).items()}
  effdet_path = tmp_path / "tf_efficientdet_d0_ap.pth"
  torch.save(effdet, effdet_path)
  config.init.backbone = str(effdet_path)
  both = pretrained.init_pretrained(reference_variables, config)
  assert _changed_leaves(reference_variables, both) == stages_too
  flat_both = _flat_variables(both)
  assert all(np.array_equal(flat_both[k], flat[k]) for k in expected)
  assert not any(np.array_equal(flat_both[k], flat[k]) for k in stages_too - expected)


def test_pretrained_files_for_another_model_are_rejected(tmp_path):
  p0_backbone = {f"backbone.{k}": v for k, v in fake_efficientnet_backbone(seed=3).items()}
  with pytest.raises(convert.CheckpointMismatchError) as info:
    pretrained.efficientdet_backbone_state_dict(p0_backbone, _config(P2))   # d0 weights for P2 (the MPII-P2 bug)
  assert "backbone.blocks.0.1.conv_dw.weight" in str(info.value)
  assert "EfficientDet checkpoint" in str(info.value)
  with pytest.raises(convert.CheckpointMismatchError, match="missing keys"):
    pretrained.imagenet_state_dict(p0_backbone, _config())   # an EfficientDet file given as the ImageNet one
  d2_tensors = fake_efficientnet_backbone(seed=4, tsv="eeffpose_p2_state_dict.tsv")
  d2_backbone = {f"backbone.{k}": v for k, v in d2_tensors.items()}
  assert len(pretrained.efficientdet_backbone_state_dict(d2_backbone, _config(P2))) == 5 + 2 * 14 + 21 * 19
  with pytest.raises(convert.CheckpointMismatchError, match="unexpected keys"):
    pretrained.efficientdet_backbone_state_dict(d2_backbone, _config())
