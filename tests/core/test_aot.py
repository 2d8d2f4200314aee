"""Ahead-of-time compilation for a TPU topology on a machine without one (`--mode compile`, meme_jax.aot): the report's
figures hold together, a batch that cannot fit is reported as not fitting, the batch search finds the boundary,
and backend-dependent model choices follow the compile target, not the host."""
import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import pytest

import meme_jax
from meme_jax import aot
from meme_jax import models
from meme_jax.models import depthwise

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
LIBTPU = importlib.util.find_spec("libtpu") is not None
# This process loads libtpu for topology descriptions as `main` would; without a TPU, several may hold it at once.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
needs_libtpu = pytest.mark.skipif(not LIBTPU, reason="compiling for a TPU needs libtpu: pip install -e '.[tpu]'")

LAUNCHER = "import sys; sys.path.insert(0, {tests!r}); import test_train; from meme_jax import main; main.run()"
CONFIG_FILE = textwrap.dedent("""
    import test_train


    def get_config(arg=""):
      config = test_train.toy_config(bn_group_size=0, batch_size=8)
      config.data.image_size = config.data.heatmap_size = (32, 32)
      config.toy.image_size = 32
      return config
""")


def compile_for_tpu(tmp_path, name, *args):
  """`python -m meme_jax.main --mode compile --topology v5e:2x2` on the toy task -> (report, stdout)."""
  config = tmp_path / "toy_config.py"
  config.write_text(CONFIG_FILE)
  workdir = tmp_path / name
  cmd = [sys.executable, "-c", LAUNCHER.format(tests=TESTS_DIR), "--config", str(config), "--mode", "compile",
         "--topology", "v5e:2x2", "--workdir", str(workdir), *args]
  proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=str(tmp_path))
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(workdir / "compile_report.json", encoding="utf-8") as f:
    return json.load(f), proc.stdout


@needs_libtpu
def test_compile_report_for_a_tpu_topology(tmp_path):
  small, printed = compile_for_tpu(tmp_path, "small", "--batch_per_chip", "2")
  large, _ = compile_for_tpu(tmp_path, "large", "--batch_per_chip", "8")
  assert small["chips"] == 4 and small["device_kind"] == "TPU v5 lite" and small["platform"] == "tpu"
  train_small, forward_small = small["compiled"]
  train_large, forward_large = large["compiled"]
  for c in (train_small, forward_small, train_large, forward_large):
    assert c["fits"] and c["flops"] > 0 and c["peak_bytes"] > 0 and c["argument_bytes"] > 0
  assert (train_small["name"], forward_small["name"]) == ("train step", "evaluation forward")
  # Six more images per chip: the forward's extra FLOPs are the toy network's two 3x3 convolutions (3 -> 8 -> 3
  # channels at 32 x 32, 2 FLOPs per multiply-add) to within what the TPU compiler's own count of padded
  # convolutions and elementwise work allows; the train step adds the backward pass. Memory grows too.
  conv_flops = 2 * 32 * 32 * 9 * (3 * 8 + 8 * 3)
  per_image = (forward_large["flops"] - forward_small["flops"]) / 6
  assert 0.75 * conv_flops < per_image < 1.25 * conv_flops
  assert 2 * conv_flops < (train_large["flops"] - train_small["flops"]) / 6 < 4 * conv_flops
  for small_c, large_c in ((train_small, train_large), (forward_small, forward_large)):
    assert large_c["temp_bytes"] > small_c["temp_bytes"]
  # Data parallelism over four chips: the train step reduces gradients across them, the forward pass does not.
  assert train_small["collectives"].get("all-reduce", 0) > 0 and not forward_small["collectives"]
  assert "train step" in printed and "TFLOP" in printed

  absurd, printed = compile_for_tpu(tmp_path, "absurd", "--batch_per_chip", str(1 << 22))
  train_absurd = absurd["compiled"][0]
  assert not train_absurd["fits"] and "memory" in train_absurd["error"].lower()
  assert f"{1 << 22}/chip  does not fit" in printed


@needs_libtpu
def test_backend_choices_follow_the_compile_target():
  config = meme_jax.load_config("configs/eeffpose_p0.py")
  planner = aot.Planner(config, aot.topology_devices("v5e:2x2"))
  assert planner.platform == "tpu" and planner.num_chips == 4
  # The host is a CPU, where 'auto' means the shift-and-add depthwise convolution; the TPU gets XLA's.
  assert models.build_model(config).depthwise_impl == depthwise.check_impl("auto")
  assert models.build_model(planner.config).depthwise_impl == "conv"


def test_depthwise_auto_by_platform():
  assert depthwise.check_impl("auto", "cpu") == "shift"
  assert depthwise.check_impl("auto", "tpu") == depthwise.check_impl("auto", "gpu") == "conv"
  assert depthwise.check_impl("shift", "tpu") == "shift"


def test_the_batch_search_finds_the_boundary():
  """A stand-in compiler whose peak bytes are fixed + per_sample * batch, with the capacity in its error text."""
  capacity, fixed, per_sample = 16 << 30, 300 << 20, 83 << 20

  def compile_at(batch):
    peak = fixed + per_sample * batch
    if peak > capacity:
      return aot.Compiled("train step", batch, False, 0.0, error=f"Ran out of memory in memory space hbm. Used "
                          f"{peak / 2**30:.2f}G of {capacity / 2**30:.2f}G hbm.")
    return aot.Compiled("train step", batch, True, 0.0, peak_bytes=peak)

  planner = aot.Planner.__new__(aot.Planner)
  planner.memory_limit, planner.device_kind = None, "TPU v5 lite"
  expected = (capacity - fixed) // per_sample
  best, tried = planner.max_batch(compile_at, start=8)
  assert best == expected
  assert [t.batch_per_chip for t in tried if t.fits][-1] == expected
  assert any(t.batch_per_chip == expected + 1 and not t.fits for t in tried)
  assert len(tried) <= 10
  # Starting above the boundary works the same way.
  assert planner.max_batch(compile_at, start=4 * expected)[0] == expected


def test_unknown_topologies_are_clear_errors():
  with pytest.raises(ValueError, match="expected 'local' or a TPU topology"):
    aot.topology_devices("v5e-8")
  with pytest.raises(ValueError, match="--num_slices"):
    aot.topology_devices("local", num_slices=2)
