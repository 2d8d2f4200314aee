"""A trainer killed with SIGKILL leaves no process and no /dev/shm entry behind, for both loaders' worker processes.

The killed process runs the real loaders with two worker processes and holds batches, as the training loop does;
what follows its death (its workers noticing, multiprocessing's resource tracker cleaning up) involves nothing else
of the trainer. Processes are followed through the session the test starts the process in. Shared-memory segments
are named with a prefix of the test's own (set in every process of the session through a `sitecustomize`), so that
one made and handed over between two polls, or still in a queue when the trainer dies, is found as surely as one
seen mapped, and segments of tests running beside this one are never taken for the trainer's; other /dev/shm entries
(semaphores) are followed through the mappings of the session's processes. The test removes whatever it finds left,
so a failure leaves no debris.
"""
import os
import secrets
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


def _prefixed_environment(site):
  """(prefix, env): an environment for a subprocess whose every process (workers and resource tracker included)
  names its shared-memory segments `prefix...`, through a `sitecustomize` in the new directory `site`."""
  prefix = f"t{secrets.token_hex(2)}_"     # leaves 3 random bytes within POSIX shared memory's 14-character names
  site.mkdir()
  (site / "sitecustomize.py").write_text(
      f"from multiprocessing import shared_memory\nshared_memory._SHM_NAME_PREFIX = '/{prefix}'\n", encoding="utf-8")
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             PYTHONPATH=os.pathsep.join(p for p in [str(site), REPO_ROOT, os.environ.get("PYTHONPATH")] if p))
  return prefix, env


@pytest.mark.parametrize("kind", ["topdown", "bottomup"])
def test_sigkill_of_the_trainer_leaves_no_worker_and_no_shared_memory(kind, tmp_path):
  samples = shared_path("data", "samples", "coco")
  shm_before = set(os.listdir("/dev/shm"))
  prefix, env = _prefixed_environment(tmp_path / "site")
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
    assert any(name.startswith(prefix) for name in names), names    # and the segments carry the test's prefix

    trainer.send_signal(signal.SIGKILL)
    trainer.wait(timeout=10)
    killed = time.time()
    while True:
      survivors = _session(trainer.pid)
      left = {name for name in os.listdir("/dev/shm") if name in names or name.startswith(prefix)}
      if (not survivors and not left) or time.time() > killed + 10:
        break
      time.sleep(0.25)
    assert survivors == [], [_cmdline(p) for p in survivors]
    assert left == set()
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
    for name in os.listdir("/dev/shm"):
      if not (name in names or name.startswith(prefix)):    # only what is surely the trainer's
        continue
      try:
        os.unlink(os.path.join("/dev/shm", name))
      except FileNotFoundError:
        pass


MAKER = textwrap.dedent("""
    from multiprocessing import shared_memory
    from data_pipelines import workers

    def make_segments():
      # A worker handing over a fresh segment per element, as grain's transport does, made as fast as it can be: the
      # trainer's death is most likely to find it between naming a segment and registering it.
      workers.exit_with_parent()
      previous = None
      while True:
        segment = shared_memory.SharedMemory(create=True, size=8192)
        if previous is not None:
          previous.close()
          previous.unlink()
        previous = segment
""")

MAKERS = textwrap.dedent("""
    import multiprocessing, time
    import maker
    processes = [multiprocessing.get_context("spawn").Process(target=maker.make_segments) for _ in range(4)]
    for p in processes:
      p.start()
    time.sleep(1.5)
    print("ready", flush=True)
    time.sleep(600)
""")


def test_workers_killed_while_making_segments_leave_none(tmp_path):
  """Workers whose trainer dies while they make segments back to back exit without leaving one in /dev/shm."""
  prefix, env = _prefixed_environment(tmp_path / "site")
  (tmp_path / "site" / "maker.py").write_text(MAKER, encoding="utf-8")
  left = {}
  for attempt in range(3):
    trainer = subprocess.Popen([sys.executable, "-c", MAKERS], cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                               text=True, start_new_session=True)
    try:
      assert trainer.stdout.readline().strip() == "ready"
      trainer.send_signal(signal.SIGKILL)
      trainer.wait(timeout=10)
      deadline = time.time() + 10
      while (_session(trainer.pid) or any(n.startswith(prefix) for n in os.listdir("/dev/shm"))) \
          and time.time() < deadline:
        time.sleep(0.25)
      assert _session(trainer.pid) == [], [_cmdline(p) for p in _session(trainer.pid)]
      left[attempt] = sorted(n for n in os.listdir("/dev/shm") if n.startswith(prefix))
    finally:
      for pid in _session(trainer.pid):
        _kill(pid)
      for name in os.listdir("/dev/shm"):
        if name.startswith(prefix):
          os.unlink(os.path.join("/dev/shm", name))
  assert not any(left.values()), left
