"""PyTorch checkpoints of the original models -> Flax variables (and orbax checkpoints).

One mechanical rule maps every original state_dict key onto the Flax variable tree, because the Flax modules are
named after the PyTorch module path, with numeric path components joined to the name before them:

    hr_backbone.6.branches.0.1.conv_pw.weight   ->  params/hr_backbone_6/branches_0_1/conv_pw/kernel
    stage2.0.fuse_layers.0.1.1.running_var      ->  batch_stats/stage2_0/fuse_layers_0_1_1/var

Leaves: conv `weight` (O, I, kh, kw) -> `kernel` (kh, kw, I, O) (also right for depthwise convs and for
ConvTranspose with `transpose_kernel=True`); 1-D `weight` -> BatchNorm `scale`; `running_mean/var` -> `mean/var`
in `batch_stats`; WeightedAdd `weights` (1, C, n, 1, 1) -> (C, n); `num_batches_tracked` is dropped.

Checkpoints may be bare state_dicts or dicts with a `state_dict` entry, may carry `module.` (DataParallel) or `1.`
(the FP16 wrapper `nn.Sequential(tofp16, model, tofp32)`) prefixes and float16 tensors, and may be xz-compressed.
Parameters shared between several module positions (the recurrent EEffNet option) appear under every position in
the state_dict; they are recognised by their shared storage and loaded once.

Command line (also `python scripts/convert_torch_checkpoint.py`):

    python -m meme_jax.convert model_best.pth --config configs/eeffpose_p0.py --output /abs/path/p0_orbax
"""
import io
import lzma
import os
import re
import sys
import tempfile
from typing import Any, Dict, Mapping, Optional, Tuple

from absl import app
from absl import flags
from flax import traverse_util
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np
import orbax.checkpoint as ocp

from meme_jax import config as config_lib
from meme_jax import models

Path = Tuple[str, ...]
_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "net")
_PREFIXES = ("module.", "1.")


class CheckpointMismatchError(ValueError):
  """A checkpoint does not fit the model a config builds. The message says what the checkpoint looks like, which
  config would fit it, and the first offending keys of each kind with their counts; `keys_file` (named in the
  message) lists every one."""

  def __init__(self, message: str, keys_file: Optional[str] = None):
    super().__init__(message)
    self.keys_file = keys_file


# ---------------------------------------------------------------------------------------------------------------
# Reading checkpoints.


def read_torch_file(path: str) -> Mapping[str, Any]:
  """Loads a `.pth` / `.pth.xz` file with torch on the CPU and returns what it holds."""
  # torch is an optional dependency (meme_jax[convert]), needed only to read .pth files.
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError("reading PyTorch checkpoints needs torch: pip install 'meme_jax[convert]' "
                      "(on these machines: pip install torch==2.13.0)") from e
  if not os.path.isfile(path):
    raise FileNotFoundError(f"checkpoint file not found: {path}")
  with open(path, "rb") as f:
    raw = f.read()
  if path.endswith(".xz") or raw[:6] == b"\xfd7zXZ\x00":
    try:
      raw = lzma.decompress(raw)
    except lzma.LZMAError as e:
      raise CheckpointMismatchError(f"{path}: not a valid xz file ({e})") from e
  try:
    return torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
  except Exception as e:  # torch raises many types for truncated or foreign files.
    raise CheckpointMismatchError(f"{path}: cannot be read as a PyTorch checkpoint ({type(e).__name__}: {e})") from e


def state_dict_from(obj: Mapping[str, Any], source: str = "checkpoint") -> Dict[str, Any]:
  """Unwraps `{'state_dict': ...}`-style containers and strips the `module.` / `1.` prefixes."""
  if not isinstance(obj, Mapping):
    raise CheckpointMismatchError(f"{source}: expected a state_dict (a mapping), got {type(obj).__name__}")
  for key in _WRAPPER_KEYS:
    if key in obj and isinstance(obj[key], Mapping):
      obj = obj[key]
      break
  sd = dict(obj)
  changed = True
  while changed and sd:
    changed = False
    for prefix in _PREFIXES:
      if all(k.startswith(prefix) for k in sd):
        sd = {k[len(prefix):]: v for k, v in sd.items()}
        changed = True
  return {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}


def load_state_dict(path: str) -> Dict[str, Any]:
  """Reads a checkpoint file and returns its (unwrapped, prefix-free) state_dict of torch tensors."""
  return state_dict_from(read_torch_file(path), source=path)


# ---------------------------------------------------------------------------------------------------------------
# The naming rule.


def module_path(torch_module_path: str) -> Path:
  """`a.3.b.0.1.c` -> ('a_3', 'b_0_1', 'c'): numeric components join the name before them."""
  out = []
  for part in torch_module_path.split("."):
    if part.isdigit():
      if not out:
        raise ValueError(f"module path {torch_module_path!r} starts with an index")
      out[-1] = f"{out[-1]}_{part}"
    else:
      out.append(part)
  return tuple(out)


def flax_location(key: str, ndim: int) -> Tuple[str, Path]:
  """Maps one state_dict key to (collection, path) in the Flax variable tree."""
  module, _, leaf = key.rpartition(".")
  prefix = module_path(module) if module else ()
  if leaf == "running_mean":
    return "batch_stats", prefix + ("mean",)
  if leaf == "running_var":
    return "batch_stats", prefix + ("var",)
  if leaf == "weight":
    return "params", prefix + ("scale" if ndim == 1 else "kernel",)
  return "params", prefix + (leaf,)


def torch_to_flax_array(key: str, value: np.ndarray) -> np.ndarray:
  """Layout change of one tensor: OIHW -> HWIO, (out, in) -> (in, out), WeightedAdd (1,C,n,1,1) -> (C, n)."""
  leaf = key.rpartition(".")[2]
  if leaf == "weights" and value.ndim == 5:
    return value.reshape(value.shape[1], value.shape[2])
  if leaf == "weight" and value.ndim == 4:
    return value.transpose(2, 3, 1, 0)
  if leaf == "weight" and value.ndim == 2:
    return value.T
  return value


def _to_numpy(tensor) -> np.ndarray:
  if isinstance(tensor, np.ndarray):
    arr = tensor
  else:
    arr = tensor.detach().cpu().float().numpy() if tensor.is_floating_point() else tensor.cpu().numpy()
  return np.asarray(arr, dtype=np.float32) if np.issubdtype(arr.dtype, np.floating) else arr


def _storage_id(tensor):
  """Identity of the memory a tensor views; equal for parameters shared between modules."""
  if isinstance(tensor, np.ndarray):
    return None
  return (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tuple(tensor.stride()))


# ---------------------------------------------------------------------------------------------------------------
# Templates and matching.


def variable_shapes(config) -> Dict[str, Dict[Path, Tuple[int, ...]]]:
  """Shapes of every Flax variable of the model `config` builds, without allocating them."""
  model = models.build_model(config)
  width, height = models.input_size(config)
  x = jax.ShapeDtypeStruct((1, height, width, 3), jnp.float32)
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros(x.shape, x.dtype), train=False))
  return {col: {p: tuple(s.shape) for p, s in traverse_util.flatten_dict(tree).items()}
          for col, tree in shapes.items()}


# Keys of each kind shown in a mismatch message; the file it names has them all (a DEM checkpoint given to an
# EEffPose config has over 1,600).
_SHOWN_KEYS = 5


def format_keys(title: str, rows, limit: Optional[int] = None) -> str:
  rows = list(rows)
  if not rows:
    return ""
  shown = rows if limit is None or len(rows) <= limit else rows[:limit]
  text = f"{title} ({len(rows)}):\n" + "\n".join(f"  {r}" for r in shown)
  return text + (f"\n  ... and {len(rows) - len(shown)} more" if len(shown) < len(rows) else "")


def _write_keys_file(source: str, text: str) -> Optional[str]:
  name = re.sub(r"[^A-Za-z0-9_.-]+", "_", os.path.basename(str(source)))[:60] or "checkpoint"
  try:
    fd, path = tempfile.mkstemp(prefix=f"checkpoint_mismatch_{name}_", suffix=".txt")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
      f.write(text + "\n")
  except OSError:
    return None
  return path


def _mismatch_error(header: str, state_dict: Mapping[str, Any], sections,
                   source: str = "checkpoint") -> CheckpointMismatchError:
  """The error for a checkpoint that does not fit: `header`, what the checkpoint looks like and which config in
  configs/ fits it, then for each (title, rows) of `sections` its count and first rows; every row goes into a file
  the message names (or, when no file can be written, into the message)."""
  description, fitting = _identify(state_dict)
  parts = [header, f"The checkpoint looks like: {description}."]
  if fitting is not None and _fits(state_dict, fitting):
    parts.append(f"It fits the model of {fitting}.")
  else:
    parts.append("No config in configs/ builds exactly this model" +
                 (f"; the nearest is {fitting}." if fitting is not None else "."))
  sections = [(title, list(rows)) for title, rows in sections if rows]
  full = "\n".join(parts + [format_keys(title, rows) for title, rows in sections])
  keys_file = _write_keys_file(source, full)
  parts += [format_keys(title, rows, None if keys_file is None else _SHOWN_KEYS) for title, rows in sections]
  if keys_file is not None:
    parts.append(f"Every key: {keys_file}")
  return CheckpointMismatchError("\n".join(parts), keys_file)


def _place(state_dict: Mapping[str, Any], template: Mapping[str, Mapping[Path, Tuple[int, ...]]], strict: bool):
  """(placed arrays by collection, unexpected keys, shape mismatches, missing variables), as rows for messages."""
  placed: Dict[str, Dict[Path, np.ndarray]] = {col: {} for col in template}
  unexpected, wrong_shape = [], []
  owners: Dict[Any, Tuple[str, Path]] = {}
  deferred = []
  for key, tensor in state_dict.items():
    value = _to_numpy(tensor)
    collection, path = flax_location(key, value.ndim)
    if collection in template and path in template[collection]:
      arr = torch_to_flax_array(key, value)
      expected = template[collection][path]
      if tuple(arr.shape) != tuple(expected):
        wrong_shape.append(f"{key}: checkpoint {tuple(value.shape)} -> {tuple(arr.shape)}, "
                           f"model {'/'.join(path)} expects {tuple(expected)}")
        continue
      placed[collection][path] = arr
      sid = _storage_id(tensor)
      if sid is not None:
        owners[sid] = (collection, path)
    else:
      deferred.append((key, tensor, value, collection, path))
  for key, tensor, value, collection, path in deferred:
    # A key with no place of its own may alias a parameter that has one (weight sharing).
    sid = _storage_id(tensor)
    if sid is not None and sid in owners:
      continue
    unexpected.append(f"{key} {tuple(value.shape)} (would be {collection}/{'/'.join(path)})")
  missing = []
  if strict:
    for collection, shapes in template.items():
      for path, shape in shapes.items():
        if path not in placed.get(collection, {}):
          missing.append(f"{collection}/{'/'.join(path)} {tuple(shape)}")
  return placed, unexpected, wrong_shape, missing


def match_state_dict(state_dict: Mapping[str, Any], template: Mapping[str, Mapping[Path, Tuple[int, ...]]],
                     *, strict: bool = True, config_name: str = "config",
                     source: str = "checkpoint") -> Dict[str, Dict[Path, np.ndarray]]:
  """Places state_dict tensors at their Flax locations, checking every key and shape.

  With `strict`, every template variable must be provided; without it (backbone initialisation), only keys that
  are provided are checked. Any unexpected key, shape mismatch or (strict) missing variable raises one error (see
  `_mismatch_error`) that counts each kind and names a file listing all of them.
  """
  placed, unexpected, wrong_shape, missing = _place(state_dict, template, strict)
  if unexpected or wrong_shape or missing:
    raise _mismatch_error(f"{source} does not fit the model built by {config_name}.", state_dict,
                         (("unexpected keys", unexpected), ("shape mismatches", wrong_shape),
                          ("missing variables", missing)), source=source)
  return placed


def _fits(state_dict: Mapping[str, Any], config_path: str) -> bool:
  """Whether the state_dict is exactly the model of `config_path` (building its variable shapes: seconds)."""
  try:
    _, unexpected, wrong_shape, missing = _place(state_dict, variable_shapes(config_lib.load_config(config_path)), True)
  except Exception:  # pylint: disable=broad-except   # a hint in an error message must not raise another error
    return False
  return not (unexpected or wrong_shape or missing)


# (neck width, joints) of the released EEffPose models and (HRNet width, joints) of the DEM ones -> their config.
_EEFFPOSE_CONFIGS = {(64, 17): "configs/eeffpose_p0.py", (64, 16): "configs/eeffpose_p0_mpii.py",
                     (112, 17): "configs/eeffpose_p2.py", (112, 16): "configs/eeffpose_p2_mpii.py"}
_DEM_CONFIGS = {(32, 17): "configs/dem_w32_coco.py", (32, 14): "configs/dem_w32_crowdpose.py",
                (32, 16): "configs/dem_w32_mpii.py", (48, 17): "configs/dem_w48_coco.py"}


def describe_state_dict(state_dict: Mapping[str, Any]) -> str:
  """A best guess of which model (family, variant, width, joints) a state_dict belongs to."""
  return _identify(state_dict)[0]


def _identify(state_dict: Mapping[str, Any]) -> Tuple[str, Optional[str]]:
  """(`describe_state_dict`'s text, the config in configs/ of a model of that family, width and joints, if any)."""
  keys = list(state_dict)
  shape = lambda k: tuple(state_dict[k].shape)  # noqa: E731
  n_params = sum(int(np.prod(shape(k))) for k in keys
                 if not (k.endswith("running_mean") or k.endswith("running_var")))
  if any(k.startswith("hr_backbone.") or k.startswith("final_layer.layers.") for k in keys):
    backbone = "eeffnet (HRB)" if any(".branches." in k for k in keys) else "efficientnet (plain)"
    neck = "bifpn" if any(k.startswith("fpn.cell.") for k in keys) else "tfneck"
    head_keys = sorted(k for k in keys if re.match(r"final_layer\.layers\.\d+\.0\.weight$", k))
    joints = shape(head_keys[0])[0] if head_keys else "?"
    width = shape(head_keys[0])[1] if head_keys else "?"
    scales = len(head_keys)
    stem = [k for k in keys if k in ("hr_backbone.0.weight", "hr_backbone.conv_stem.weight")]
    blocks = {m.group(1) for k in keys for m in [re.match(r"hr_backbone\.9\.branches\.2\.(\d+)\.", k)] if m}
    size = {64: "P0 (EfficientNet-B0)", 112: "P2 (EfficientNet-B2)"}.get(width, f"neck width {width}")
    if blocks and not stem:
      size += ", no stem"
    fitting = _EEFFPOSE_CONFIGS.get((width, joints)) if backbone.startswith("eeffnet") and neck == "tfneck" else None
    return (f"EEffPose, backbone {backbone}, neck {neck}, head with {scales} scales, {size}, {joints} joints, "
            f"{n_params:,} parameters"), fitting
  if any(k.startswith("stage4.") for k in keys):
    c2 = [shape(k)[0] for k in keys if k == "stage2.0.branches.0.0.conv1.weight"]
    width = f"HRNet-W{c2[0]}" if c2 else "HRNet"
    if any(k.startswith("final_layers_ae.") for k in keys):
      heat = [shape(k)[0] for k in keys if k == "final_layers_ae.1.weight"]
      joints = heat[0] - 1 if heat else "?"
      fitting = _DEM_CONFIGS.get((c2[0] if c2 else None, joints))
      return f"DEM (double embedding), {width}, {joints} joints + centre, {n_params:,} parameters", fitting
    if any(k.startswith("final_layers.") for k in keys):
      return f"HigherHRNet ({width}), {n_params:,} parameters", None
    return f"{width} backbone only (e.g. ImageNet classification weights), {n_params:,} parameters", None
  if any(k.startswith("backbone.") for k in keys):
    return f"EfficientDet checkpoint (backbone + BiFPN + box/class nets), {n_params:,} parameters", None
  if any(k.startswith("blocks.") for k in keys) and "conv_stem.weight" in keys:
    return f"timm EfficientNet classification checkpoint, {n_params:,} parameters", None
  return f"unrecognised layout, {len(keys)} tensors, {n_params:,} parameters", None


# ---------------------------------------------------------------------------------------------------------------
# Public entry points.


def _config_name(config) -> str:
  name = config.get("name", None) if hasattr(config, "get") else None
  return f"config {name!r}" if name else "the given config"


def variables_from_state_dict(state_dict: Mapping[str, Any], config, *, strict: bool = True,
                              source: str = "checkpoint") -> Dict[str, Any]:
  """Converts a state_dict (already unwrapped) into `{'params': ..., 'batch_stats': ...}` for `config`'s model."""
  template = variable_shapes(config)
  placed = match_state_dict(state_dict, template, strict=strict, config_name=_config_name(config), source=source)
  return {col: traverse_util.unflatten_dict(flat) for col, flat in placed.items() if flat}


def from_torch(checkpoint_path: str, config) -> Dict[str, Any]:
  """Reads an original checkpoint (`.pth`, `.pth.xz`; any prefix/dtype variant) into Flax variables."""
  state_dict = load_state_dict(checkpoint_path)
  return variables_from_state_dict(state_dict, config, source=checkpoint_path)


def merge_variables(base: Mapping[str, Any], update: Mapping[str, Any]) -> Dict[str, Any]:
  """Returns `base` with every leaf that `update` provides replaced (shapes must agree)."""
  out = {}
  for col, tree in base.items():
    flat = traverse_util.flatten_dict(tree)
    for path, value in traverse_util.flatten_dict(update.get(col, {})).items():
      if path not in flat:
        raise KeyError(f"{col}/{'/'.join(path)} is not a variable of the model")
      if tuple(np.shape(flat[path])) != tuple(np.shape(value)):
        raise ValueError(f"{col}/{'/'.join(path)}: shape {np.shape(value)} != {np.shape(flat[path])}")
      flat[path] = np.asarray(value, dtype=np.asarray(flat[path]).dtype)
    out[col] = traverse_util.unflatten_dict(flat)
  return out


def save_variables(directory: str, variables: Mapping[str, Any]) -> str:
  """Writes Flax variables as an orbax checkpoint directory (what `--config.init.checkpoint` accepts)."""
  directory = os.path.abspath(directory)
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(directory, variables, force=True)
  return directory


def load_variables(directory: str) -> Dict[str, Any]:
  """Reads variables written by `save_variables` as numpy arrays."""
  with ocp.StandardCheckpointer() as checkpointer:
    restored = checkpointer.restore(os.path.abspath(directory))
  return restored


def define_flags() -> None:
  """The command line's flags (in absl's global flags: call once, in the program that runs `main`)."""
  config_flags.DEFINE_config_file("config", None, "configs/NAME.py[:ARG] describing the model", lock_config=False)
  flags.DEFINE_string("output", None, "directory to write the orbax checkpoint to")
  flags.mark_flags_as_required(["config", "output"])


def main(argv) -> int:
  """Converts the checkpoint named by the one argument; 2 when it does not fit the config's model."""
  if len(argv) != 2:
    raise app.UsageError("give one checkpoint: model_best.pth, checkpoint_*.pth or .pth.xz of the original code")
  checkpoint = argv[1]
  try:
    variables = from_torch(checkpoint, flags.FLAGS.config)
  except CheckpointMismatchError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  count = sum(int(np.prod(np.shape(v))) for v in traverse_util.flatten_dict(variables["params"]).values())
  path = save_variables(flags.FLAGS.output, variables)
  print(f"converted {checkpoint} ({count:,} parameters) -> {path}")
  return 0


def run() -> None:
  """Runs `main` on this process's command line, once `define_flags` has defined the flags."""
  app.run(main, argv=config_lib.resolve_config_argument(sys.argv))


if __name__ == "__main__":
  define_flags()
  run()
