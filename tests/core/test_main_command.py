"""`python -m meme_jax.main` as a user runs it: the README's main command, backbone initialisation, failures.

Each test starts the real command in a subprocess. The README's command is read from the README itself (the parser
`.ci/run` uses), so the documented command and the tested one cannot drift apart; the tests only shorten it by
flags. The tests share one persistent compilation cache and one xdist group (they run one after another on one
worker): the same P0 train step then compiles once for all of them.
"""
import glob
import importlib.util
import os
import shlex
import shutil
import signal
import struct
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import meme_jax
from conftest import REPO_ROOT, shared_path
from original_checkpoints import HRNET_HEAD_PREFIXES, fake_efficientnet_backbone, fake_imagenet_hrnet
from original_checkpoints import torch_state_dict
from meme_jax import convert
from meme_jax import evaluate
from meme_jax import tasks
from meme_jax import train

pytestmark = pytest.mark.xdist_group("main_command")

SHORT = ("--config.train.num_epochs=1", "--config.train.steps_per_epoch=2")


def readme_commands():
  spec = importlib.util.spec_from_file_location("readme_commands", os.path.join(REPO_ROOT, ".ci", "readme_commands.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  with open(os.path.join(REPO_ROOT, "README.md"), encoding="utf-8") as f:
    return module.quick_start_commands(f.read())


def readme_main_command():
  """The README's main command as an argument list: `python -m meme_jax.main ...` after its install step."""
  for command in readme_commands():
    for part in command.split("&&"):
      args = shlex.split(part)
      if args[:3] == ["python", "-m", "meme_jax.main"]:
        return args
  raise AssertionError("the README's Quick start has no `python -m meme_jax.main` command")


def with_workdir(args, workdir):
  out = list(args)
  out[out.index("--workdir") + 1] = str(workdir)
  return out


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("compilation_cache"))


def run_main(args, cwd, cache_dir, timeout=900, **popen):
  """Runs `args` (starting with `python -m meme_jax.main`) with this interpreter; returns the CompletedProcess.
  `cache_dir`: the persistent compilation cache to use (None: the default, in the workdir)."""
  cmd = [sys.executable] + list(args[1:]) + ([f"--compilation_cache_dir={cache_dir}"] if cache_dir else [])
  env = dict(os.environ, PYTHONPATH=REPO_ROOT, JAX_PLATFORMS="cpu")
  return subprocess.run(cmd, cwd=str(cwd), capture_output=True, text=True, timeout=timeout, env=env, **popen)


def last_line(text):
  lines = [line for line in text.strip().splitlines() if line.strip()]
  return lines[-1] if lines else ""


def tensorboard_events(workdir):
  """Every Event in the workdir's TensorBoard files (TFRecord framing: length, crc, payload, crc)."""
  from tensorboardX.proto import event_pb2  # pylint: disable=import-outside-toplevel
  events = []
  for path in glob.glob(os.path.join(workdir, "events.out.tfevents.*")):
    with open(path, "rb") as f:
      data = f.read()
    pos = 0
    while pos + 12 <= len(data):
      (length,) = struct.unpack("<Q", data[pos:pos + 8])
      payload = data[pos + 12:pos + 12 + length]
      pos += 12 + length + 4
      event = event_pb2.Event()
      event.ParseFromString(payload)
      events.append(event)
  return events


def process_group(pgid):
  """PIDs of the live processes in process group `pgid`."""
  out = []
  for entry in os.listdir("/proc"):
    if entry.isdigit():
      try:
        if os.getpgid(int(entry)) == pgid:
          out.append(int(entry))
      except OSError:
        pass
  return out


def command_line(pid):
  try:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
      return f.read().replace(b"\0", b" ").decode(errors="replace")[:200]
  except OSError:
    return "?"


def test_readme_main_command_writes_summary_pictures_and_checkpoint(tmp_path, cache_dir):
  workdir = tmp_path / "workdir"
  args = with_workdir(readme_main_command(), workdir) + list(SHORT)
  proc = run_main(args, tmp_path, None)
  assert proc.returncode == 0, proc.stderr[-4000:]
  # The compiled train step went to the persistent cache in the workdir (on by default); the other tests of this
  # module start from a copy of it.
  cached = os.listdir(workdir / "compilation_cache")
  assert any(name.startswith("jit_step-") for name in cached), cached
  shutil.copytree(workdir / "compilation_cache", cache_dir, dirs_exist_ok=True)
  # The AP line with the baseline, the stats, then the timing line naming the summary.
  lines = proc.stdout.strip().splitlines()
  assert lines[-3].startswith("AP ") and "mean-pose baseline AP" in lines[-3], proc.stdout[-2000:]
  assert lines[-1].startswith("2 steps in ") and lines[-1].endswith(str(workdir / "summary.json"))

  import json  # pylint: disable=import-outside-toplevel
  with open(workdir / "summary.json", encoding="utf-8") as f:
    summary = json.load(f)
  assert summary["step"] == 2 and 0.0 <= summary["AP"] <= 1.0 and summary["baseline_AP"] > 0.0

  events = tensorboard_events(str(workdir))
  images = [v for e in events for v in e.summary.value if v.HasField("image")]
  scalars = {v.tag for e in events for v in e.summary.value if v.HasField("simple_value")}
  assert images, "no prediction pictures in the TensorBoard events"
  picture = images[0].image
  assert picture.height > 0 and picture.width > 0 and picture.encoded_image_string[:4] == b"\x89PNG"
  assert any(tag.startswith("val/") for tag in scalars) and any("loss" in tag for tag in scalars)

  config = meme_jax.load_config("configs/eeffpose_p0.py:synthetic")
  variables, step = evaluate.restore_variables(config, str(workdir), "latest")
  assert step == 2
  leaves = jax.tree.leaves(variables["params"])
  assert len(leaves) > 500 and all(np.isfinite(np.asarray(x)).all() for x in leaves)


def _flat(variables):
  from flax import traverse_util  # pylint: disable=import-outside-toplevel
  return {(c,) + k: np.asarray(v) for c in ("params",) for k, v in traverse_util.flatten_dict(variables[c]).items()}


def _expected_from_file(state_dict):
  """{flax location: value} of a torch-keyed state_dict, by the converter's naming rule."""
  out = {}
  for key, tensor in state_dict.items():
    if key.endswith("num_batches_tracked"):
      continue
    collection, path = convert.flax_location(key, tensor.ndim)
    if collection == "params":
      out[(collection,) + path] = convert.torch_to_flax_array(key, tensor.numpy())
  return out


def _fresh_params(config):
  """The config's own initialisation, as the trainer derives it from the seed."""
  task = tasks.get_task(config)
  model = task.build_model(train.training_config(config))
  init_rng, _ = jax.random.split(jax.random.PRNGKey(int(config.get("seed", 0))))
  config = config.copy_and_resolve_references()
  config.init.backbone = config.init.backbone_copies = ""
  return _flat(train.initial_variables(model, config, init_rng))


def _check_initialised(workdir, config, from_files):
  """After one step at learning rate 0: the files' leaves equal the files, every other leaf the fresh init."""
  variables, step = evaluate.restore_variables(config, str(workdir), "latest")
  assert step == 1
  got = _flat(variables)
  fresh = _fresh_params(config)
  assert set(got) == set(fresh) and set(from_files) < set(got)
  for location, value in got.items():
    expected = from_files.get(location, fresh[location])
    np.testing.assert_array_equal(value, expected, err_msg="/".join(location))
  # The files really differ from the fresh initialisation, so the comparison above means something.
  assert all(not np.array_equal(fresh[k], v) for k, v in from_files.items() if v.size > 1)


def test_efficientdet_and_imagenet_backbones_through_main(tmp_path, cache_dir):
  import torch  # pylint: disable=import-outside-toplevel
  # tf_efficientdet_d0_ap: the detector's backbone under `backbone.`, plus BiFPN and head tensors that are ignored.
  effdet_backbone = fake_efficientnet_backbone(seed=11)
  effdet = {f"backbone.{k}": v for k, v in effdet_backbone.items()}
  effdet.update({"fpn.cell.0.fnode.0.combine.edge_weights": torch.ones(2),
                 "class_net.predict.conv_pw.bias": torch.ones(810), "backbone.bn1.num_batches_tracked": torch.tensor(3)})
  # timm tf_efficientnet_b0_aa: the classifier's backbone at the top level, plus its head.
  imagenet = fake_efficientnet_backbone(seed=12)
  imagenet.update({"conv_head.weight": torch.ones(1280, 320, 1, 1), "classifier.weight": torch.ones(1000, 1280)})
  torch.save(effdet, tmp_path / "tf_efficientdet_d0_ap-d0cdbd0a.pth")
  torch.save(imagenet, tmp_path / "tf_efficientnet_b0_aa-827b6e33.pth")

  config = meme_jax.load_config("configs/eeffpose_p0.py:synthetic")
  config.init.backbone = str(tmp_path / "tf_efficientdet_d0_ap-d0cdbd0a.pth")
  config.init.backbone_copies = str(tmp_path / "tf_efficientnet_b0_aa-827b6e33.pth")
  workdir = tmp_path / "workdir"
  args = ["python", "-m", "meme_jax.main", "--config", "configs/eeffpose_p0.py:synthetic", "--workdir", str(workdir),
          f"--config.init.backbone={config.init.backbone}", f"--config.init.backbone_copies={config.init.backbone_copies}",
          "--config.train.lr=0.0", "--config.train.num_epochs=1", "--config.train.steps_per_epoch=1",
          # The step must run however slow the machine: no time budget to stop it before the first step.
          "--config.train.time_budget_s=0"]
  proc = run_main(args, tmp_path, cache_dir)
  assert proc.returncode == 0, proc.stderr[-4000:]

  # Where each file's tensors belong, by the original's rules: EfficientDet on the stem and the original stage
  # branches (stage s -> HRB s+3, its last branch), ImageNet on the copied branches of HRB 6-9.
  last_branch = {0: 0, 1: 0, 2: 0, 3: 1, 4: 1, 5: 2, 6: 2}
  targets = {}
  for key, tensor in imagenet.items():
    for hrb, blocks in ((6, 3), (7, 3), (8, 4), (9, 1)):
      for j in range(blocks):
        for branch, source in ((0, "blocks.2.1."), (1, "blocks.4.2.")):
          if key.startswith(source) and (branch == 0 or hrb >= 8):
            targets[f"hr_backbone.{hrb}.branches.{branch}.{j}.{key[len(source):]}"] = tensor
  for key, tensor in effdet_backbone.items():
    if key.startswith("blocks."):
      s, j, rest = key.split(".", 3)[1:]
      targets[f"hr_backbone.{int(s) + 3}.branches.{last_branch[int(s)]}.{j}.{rest}"] = tensor
    else:
      targets[key.replace("conv_stem.", "hr_backbone.0.").replace("bn1.", "hr_backbone.1.")] = tensor
  _check_initialised(workdir, config, _expected_from_file(targets))


def test_imagenet_hrnet_backbone_through_main(tmp_path, cache_dir):
  import torch  # pylint: disable=import-outside-toplevel
  reference = torch_state_dict(shared_path("reference", "dem_tiny_coco", "model_best.pth.xz"))
  # Other values than the reference's, so that nothing can match by accident.
  generator = torch.Generator().manual_seed(5)
  sd = {k: (torch.randn(v.shape, generator=generator) if v.is_floating_point() else v) for k, v in reference.items()}
  imagenet = fake_imagenet_hrnet(sd)
  torch.save({"state_dict": {"module." + k: v for k, v in imagenet.items()}}, tmp_path / "hrnet_w32-36af842e.pth")

  # The synthetic job on the reference's backbone shape, which the fake ImageNet checkpoint has.
  config = meme_jax.load_config("configs/dem_w32_coco.py:synthetic")
  tiny = meme_jax.load_config("configs/dem_w32_coco.py:tiny").model
  shape = {f"model.{stage}.{field}": tiny[stage][field] for stage in ("stage1", "stage2", "stage3", "stage4", "deconv")
           for field in ("num_blocks", "num_channels") if field in tiny[stage]}
  for key, value in shape.items():
    section, field = key.split(".")[1:]
    config.model[section][field] = value
  config.init.backbone = str(tmp_path / "hrnet_w32-36af842e.pth")
  workdir = tmp_path / "workdir"
  args = ["python", "-m", "meme_jax.main", "--config", "configs/dem_w32_coco.py:synthetic", "--workdir", str(workdir),
          f"--config.init.backbone={config.init.backbone}", "--config.train.lr=0.0", "--config.train.num_epochs=1",
          "--config.train.steps_per_epoch=1", "--config.train.eval_every_epochs=1", "--config.train.time_budget_s=0"]
  args += [f"--config.{key}={tuple(value)}" for key, value in shape.items()]
  proc = run_main(args, tmp_path, cache_dir)
  assert proc.returncode == 0, proc.stderr[-4000:]
  backbone = {k: v for k, v in sd.items() if not k.startswith(HRNET_HEAD_PREFIXES)}
  _check_initialised(workdir, config, _expected_from_file(backbone))


def test_corrupt_training_image_ends_the_run_at_once_with_the_error_last(tmp_path, cache_dir):
  # The synthetic dataset, generated by the first run in this folder, then one training image broken.
  data_root = tmp_path / "data" / "synthetic"
  from data_pipelines import synthetic  # pylint: disable=import-outside-toplevel
  config = meme_jax.load_config("configs/eeffpose_p0.py:synthetic")
  os.chdir(tmp_path)
  try:
    synthetic.ensure_synthetic_dataset(config.data)
  finally:
    os.chdir(REPO_ROOT)
  train_images = sorted(glob.glob(str(data_root / "images" / "train" / "*.jpg")))
  for path in train_images:          # whichever the first batch reads
    with open(path, "wb") as f:
      f.write(b"\xff\xd8 this is not a JPEG")

  args = ["python", "-m", "meme_jax.main", "--config", "configs/eeffpose_p0.py:synthetic",
          "--workdir", str(tmp_path / "workdir"), "--config.data.num_workers=2"] + list(SHORT)
  proc = subprocess.Popen([sys.executable] + args[1:] + [f"--compilation_cache_dir={cache_dir}"], cwd=str(tmp_path),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                          env=dict(os.environ, PYTHONPATH=REPO_ROOT, JAX_PLATFORMS="cpu"))
  try:
    _, stderr = proc.communicate(timeout=900)
    # Nothing of the run's process group is left a few seconds later (workers re-parented to init keep the group;
    # multiprocessing's resource tracker exits once the last process holding its pipe is gone).
    deadline = time.time() + 10.0
    while True:
      group = process_group(proc.pid)
      if not group or time.time() > deadline:
        break
      time.sleep(0.2)
    leftover = {pid: command_line(pid) for pid in group}
  finally:
    try:
      os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
      pass
  assert proc.returncode == 2, stderr[-4000:]
  line = last_line(stderr)
  assert line.startswith("error: ") and any(os.path.basename(p) in line for p in train_images), stderr[-3000:]
  assert "skip_bad_records" in line
  assert not leftover, f"processes left behind: {leftover}"


def test_bad_backbone_file_fails_before_the_compilation_ends(tmp_path, cache_dir):
  bad = tmp_path / "tf_efficientdet_d0_ap.pth"
  bad.write_bytes(b"not a torch file")
  args = ["python", "-m", "meme_jax.main", "--config", "configs/eeffpose_p0.py:synthetic",
          "--workdir", str(tmp_path / "workdir"), f"--config.init.backbone={bad}",
          "--config.train.mixed_precision=bfloat16"] + list(SHORT)   # a train step the cache has not seen
  start = time.time()
  proc = run_main(args, tmp_path, cache_dir)
  elapsed = time.time() - start
  assert proc.returncode != 0
  line = last_line(proc.stderr)
  assert line.startswith("error: ") and str(bad) in line, proc.stderr[-3000:]
  # The train step compiles in a second thread while the variables are initialised; a failed initialisation ends
  # the run without waiting for it (which takes a minute or more on a CPU).
  assert elapsed < 45, f"took {elapsed:.0f}s"
