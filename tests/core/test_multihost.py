"""Two local CPU processes train as two hosts through the command line (jax.distributed over 127.0.0.1).

Each process has 2 CPU devices (4 in the mesh) and loads its half of every global batch; the result must match one
process with 4 devices, and a second launch must resume from the checkpoint the two processes wrote (each with its
own data iterator state).
"""
import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

import test_train as tt

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(os.path.dirname(TESTS_DIR))

LAUNCHER = ("import sys; sys.path.insert(0, {tests!r}); import test_train; from meme_jax import main; main.run()")

CONFIG_FILE = """
import test_train


def get_config(arg=""):
  # SGD keeps runs on different device layouts comparable (see tests/core/test_train.py).
  return test_train.toy_config(num_epochs=int(arg or 2), optimizer="sgd", lr=0.5, bn_group_size=4)
"""


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def launch(config: str, workdir: str, devices: int, extra=()):
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu")
  cmd = [sys.executable, "-c", LAUNCHER.format(tests=TESTS_DIR), "--config", config, "--workdir", workdir,
         *extra]
  return subprocess.Popen(cmd, env=env, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def two_hosts(config: str, workdir: str):
  port = free_port()
  procs = [launch(config, workdir, 2, ["--coordinator_address", f"127.0.0.1:{port}", "--num_processes", "2",
                                       "--process_id", str(i)]) for i in range(2)]
  outputs = []
  for p in procs:
    try:
      out, err = p.communicate(timeout=300)
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      raise
    outputs.append((p.returncode, out, err))
  for i, (code, out, err) in enumerate(outputs):
    assert code == 0, f"process {i} failed:\n{err[-4000:]}"
  return outputs


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  root = tmp_path_factory.mktemp("multihost")
  config_path = root / "toy_multihost.py"
  config_path.write_text(CONFIG_FILE)
  reference = str(root / "one_process")
  p = launch(str(config_path), reference, 4)
  out, err = p.communicate(timeout=300)
  assert p.returncode == 0, err[-4000:]
  multi = str(root / "two_processes")
  outputs = two_hosts(str(config_path), multi)
  return dict(config=str(config_path), reference=reference, multi=multi, outputs=outputs, reference_out=out)


def test_two_processes_match_one(runs):
  config = tt.toy_config(num_epochs=2, optimizer="sgd", lr=0.5, bn_group_size=4)
  ref_state, ref_meta, ref_step = tt.final_state(runs["reference"], config)
  state, meta, step = tt.final_state(runs["multi"], config)
  assert step == ref_step == 12
  assert tt.max_relative_diff(state.params, ref_state.params) < 1e-5
  assert tt.max_relative_diff(state.batch_stats, ref_state.batch_stats) < 1e-5
  assert meta["schedule"]["kind"] == ref_meta["schedule"]["kind"]
  # Only process 0 prints the result and writes the summary; the data iterator state is saved per process.
  (code0, out0, _), (code1, out1, _) = runs["outputs"]
  assert "AP " in out0 and "AP " not in out1
  with open(os.path.join(runs["multi"], "summary.json"), encoding="utf-8") as f:
    summary = json.load(f)
  assert summary["processes"] == 2 and summary["devices"] == 4
  data_dir = os.path.join(runs["multi"], "checkpoints", str(step), "data")
  names = sorted(n for n in os.listdir(data_dir) if n.endswith(".json"))
  assert names == ["process_0-of-2.json", "process_1-of-2.json"]
  states = []
  for name in names:
    with open(os.path.join(data_dir, name), encoding="utf-8") as f:
      states.append(json.load(f))
  assert states[0] == states[1]          # both processes consumed the same number of batches


def test_two_processes_resume(runs):
  two_hosts(runs["config"] + ":3", runs["multi"])
  config = tt.toy_config(num_epochs=3, optimizer="sgd", lr=0.5, bn_group_size=4)
  state, _, step = tt.final_state(runs["multi"], config)
  assert step == 16
  with open(os.path.join(runs["multi"], "summary.json"), encoding="utf-8") as f:
    summary = json.load(f)
  assert summary["steps_this_run"] == 4 and summary["step"] == 16
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state.params))
