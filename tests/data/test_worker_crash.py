"""A trainer killed with SIGKILL leaves no process and no /dev/shm entry behind, for both loaders' worker processes.

The killed process runs the real loaders with two worker processes and holds batches, as the training loop does;
what follows its death (its workers noticing, multiprocessing's resource tracker cleaning up) involves nothing else
of the trainer. Processes are followed through the session the test starts the process in, shared-memory entries
through the mappings of those processes; the test removes whatever it finds left, so a failure leaves no debris.
"""
import os
import selectors
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from conftest import REPO_ROOT, shared_path

SCRIPT = textwrap.dedent("""
    import sys, time
    import meme_jax
    kind, annotations, images = sys.argv[1:4]
    if kind == "topdown":
      from data_pipelines import topdown
      config = meme_jax.load_config("configs/eeffpose_p0.py")
      config.data.train_annotations, config.data.train_images = annotations, images
      config.data.image_size, config.data.heatmap_size = (48, 64), (12, 16)
      config.data.chunk_size = 4     # one batch per chunk: the batches below come from both workers
      loader = topdown.train_loader(config, seed=0, shard_index=0, shard_count=1, batch_size_per_process=4,
                                    num_workers=2)
    else:
      from configs import dem_common
      from data_pipelines import bottomup
      config = meme_jax.load_config("configs/dem_w32_coco.py")
      dem_common.tiny(config, input_size=64)
      config.data.train_annotations, config.data.train_images = annotations, images
      loader = bottomup.bottomup_train_loader(config, seed=0, shard_index=0, shard_count=1,
                                              batch_size_per_process=2, num_workers=2)
    it = iter(loader)
    held = [next(it) for _ in range(4)]    # batches in use, as the training step holds them
    print("ready", flush=True)
    time.sleep(600)
""")


def _stat(pid: int):
  """(state, session id) of a process, None when there is none."""
  try:
    with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
      fields = f.read().rsplit(")", 1)[1].split()
  except (FileNotFoundError, ProcessLookupError):
    return None
  return fields[0], int(fields[3])


def _session(sid: int):
  """Live (not zombie) processes of session `sid`."""
  out = []
  for entry in os.listdir("/proc"):
    if entry.isdigit():
      stat = _stat(int(entry))
      if stat is not None and stat[1] == sid and stat[0] != "Z":
        out.append(int(entry))
  return sorted(out)


def _shm_mapped_by(pids):
  names = set()
  for pid in pids:
    try:
      with open(f"/proc/{pid}/maps", encoding="utf-8") as f:
        for line in f:
          fields = line.split(maxsplit=5)
          path = fields[5].strip() if len(fields) == 6 else ""
          if path.startswith("/dev/shm/"):
            names.add(path[len("/dev/shm/"):].replace(" (deleted)", ""))
    except (FileNotFoundError, ProcessLookupError, PermissionError):
      pass
  return names


def _cmdline(pid: int) -> str:
  try:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
      return f.read().replace(b"\0", b" ").decode(errors="replace")
  except (FileNotFoundError, ProcessLookupError):
    return ""


def _kill(pid: int) -> None:
  try:
    os.kill(pid, signal.SIGKILL)
  except ProcessLookupError:
    pass


def _new_unmapped(before, since: float):
  """/dev/shm entries made since `since` (not in `before`) that no process maps: nobody's any more, or in flight."""
  found = set()
  for name in set(os.listdir("/dev/shm")) - before:
    try:
      if os.stat(os.path.join("/dev/shm", name)).st_ctime >= since:
        found.add(name)
    except FileNotFoundError:
      pass
  live = [int(e) for e in os.listdir("/proc") if e.isdigit()]
  return found - _shm_mapped_by(live)


@pytest.mark.parametrize("kind", ["topdown", "bottomup"])
def test_sigkill_of_the_trainer_leaves_no_worker_and_no_shared_memory(kind, tmp_path):
  samples = shared_path("data", "samples", "coco")
  shm_before = set(os.listdir("/dev/shm"))
  started = time.time() - 1
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             PYTHONPATH=REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  log = open(tmp_path / "stderr.txt", "w+", encoding="utf-8")   # pylint: disable=consider-using-with
  trainer = subprocess.Popen([sys.executable, "-c", SCRIPT, kind, os.path.join(samples, "test_coco.json"), samples],
                             cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=log, text=True,
                             start_new_session=True)
  names = set()      # /dev/shm entries the trainer's processes mapped at some point
  try:
    ready = selectors.DefaultSelector()
    ready.register(trainer.stdout, selectors.EVENT_READ)
    deadline = time.time() + 180
    while not ready.select(timeout=0.2):
      names |= _shm_mapped_by(_session(trainer.pid))
      assert trainer.poll() is None and time.time() < deadline, (tmp_path / "stderr.txt").read_text()
    assert trainer.stdout.readline().strip() == "ready", (tmp_path / "stderr.txt").read_text()
    # Both workers have made batches: the session holds the trainer, the two workers and the resource tracker.
    ours = _session(trainer.pid)
    names = (names | _shm_mapped_by(ours)) - shm_before
    assert sum("spawn_main" in _cmdline(p) for p in ours) == 2, [_cmdline(p)[-80:] for p in ours]
    assert sum("resource_tracker" in _cmdline(p) for p in ours) == 1, [_cmdline(p)[-80:] for p in ours]
    assert names     # the run does use /dev/shm (semaphores, segments): what must go with it

    trainer.send_signal(signal.SIGKILL)
    trainer.wait(timeout=10)
    killed = time.time()
    while True:
      survivors = _session(trainer.pid)
      left = names & set(os.listdir("/dev/shm"))
      unmapped = _new_unmapped(shm_before, started)
      if (not survivors and not left and not unmapped) or time.time() > killed + 10:
        break
      time.sleep(0.25)
    assert survivors == [], [_cmdline(p) for p in survivors]
    assert left == set() and unmapped == set()
  finally:
    if trainer.poll() is None:
      trainer.kill()
      trainer.wait()
    # Survivors: workers first, so that the resource tracker, when they are gone, unlinks what they registered.
    for pid in _session(trainer.pid):
      if "resource_tracker" not in _cmdline(pid):
        _kill(pid)
    for _ in range(20):
      if not _session(trainer.pid):
        break
      time.sleep(0.25)
    for pid in _session(trainer.pid):
      _kill(pid)
    log.close()
    for name in names & set(os.listdir("/dev/shm")):    # only what is surely the trainer's
      try:
        os.unlink(os.path.join("/dev/shm", name))
      except FileNotFoundError:
        pass
