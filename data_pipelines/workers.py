"""The grain plumbing the input pipelines share: which shard this process reads, starting the worker processes, and
what every worker does first (one core for cv2, exit with the trainer).

grain stops its worker processes when the trainer closes the iterator or exits normally. A trainer killed outright
(SIGKILL: an OOM kill, a node failure) does neither, and its workers would wait on their full queues for ever,
holding their memory and keeping multiprocessing's resource tracker alive, so that the shared memory of the run
(grain's queues, semaphores and batches, the top-down slots) stayed in /dev/shm too.
"""
import multiprocessing
import multiprocessing.synchronize
import os
import sys
import threading
import time
from multiprocessing import shared_memory
from typing import Tuple

from absl import flags
import cv2
import grain

# Set in worker processes only: where the pipelines place their batches depends on it (shared memory to hand them to
# the trainer, plain memory inside the trainer).
_in_worker_process = False


def in_worker_process() -> bool:
  """True in a worker process started by `prefetch_in_processes`."""
  return _in_worker_process


def shard_for_this_process() -> Tuple[int, int]:
  """(shard_index, shard_count) of this JAX process, as grain's ShardByJaxProcess gives them."""
  options = grain.sharding.ShardByJaxProcess(drop_remainder=True)
  return options.shard_index, options.shard_count


def ensure_absl_flags_parsed() -> None:
  # grain's worker processes read absl flags; outside absl.app (tests, notebooks) they are not parsed yet.
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


# Where a named segment or semaphore is between its creation under its name and its registration with the resource
# tracker: a process ending there leaves it in /dev/shm for good, since nothing else knows the name.
_NAMING_CODE = (shared_memory.SharedMemory.__init__.__code__, multiprocessing.synchronize.SemLock.__init__.__code__)


def _naming_in_progress() -> bool:
  """True while a thread of this process is inside the creation of a named segment or semaphore."""
  for frame in sys._current_frames().values():    # pylint: disable=protected-access
    while frame is not None:
      if frame.f_code in _NAMING_CODE:
        return True
      frame = frame.f_back
  return False


def _exit_when_parent_is_gone(parent) -> None:
  # The sentinel is the read end of a pipe whose write end only the parent holds (multiprocessing's spawn start
  # method passes no other descriptors on): it reaches end-of-file when the parent process is gone, however it died.
  # PR_SET_PDEATHSIG would be the kernel's way, but it fires when the *thread* that started the worker exits, and
  # grain starts workers from threads of its own pools, which may end while training goes on.
  parent.join()
  try:
    os.write(2, f"input worker {os.getpid()}: the trainer (process {parent.pid}) is gone; exiting\n".encode())
  except OSError:   # no stderr left to tell: exit all the same
    pass
  # Nothing of this process's own is left to save. What it shared with the trainer under a name (semaphores, grain's
  # segments, slots the trainer had not mapped yet) is registered with the resource tracker, which the trainer and
  # every worker share and which unlinks it all when the last of them has exited, i.e. now. Only a segment being made
  # is not registered yet, so the exit waits until no thread is making one: the creating thread needs microseconds
  # (its system calls release the GIL, so it is often caught inside one), and a blocked one (a full queue) is never
  # inside. Between the last check and the exit this thread keeps the GIL, having just taken it (a waiting thread only
  # asks for it after the switch interval), so no thread can start a new segment in between.
  deadline = time.monotonic() + 5
  while _naming_in_progress() and time.monotonic() < deadline:
    time.sleep(0.001)
  os._exit(1)   # pylint: disable=protected-access


def exit_with_parent() -> None:
  """Makes this process exit when the process that started it (through multiprocessing) is gone."""
  parent = multiprocessing.parent_process()
  if parent is None:        # not a multiprocessing child
    return
  threading.Thread(target=_exit_when_parent_is_gone, args=(parent,), name="exit-with-trainer", daemon=True).start()


def init_worker(worker_index: int = 0, worker_count: int = 1) -> None:
  """The start of every worker process (grain's `worker_init_fn`)."""
  del worker_index, worker_count
  global _in_worker_process
  _in_worker_process = True
  cv2.setNumThreads(1)     # one core per worker; cv2's own threads would oversubscribe
  exit_with_parent()


def prefetch_in_processes(dataset: grain.IterDataset, num_workers: int,
                          per_worker_buffer_size: int) -> grain.IterDataset:
  """`dataset` produced by `num_workers` worker processes, each `init_worker`ed, holding up to
  `per_worker_buffer_size` elements ready."""
  ensure_absl_flags_parsed()
  return dataset.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers,
                                                          per_worker_buffer_size=per_worker_buffer_size),
                             worker_init_fn=init_worker)
