"""What every grain worker process of the input pipelines does first: one core for cv2, and exit with the trainer.

grain stops its worker processes when the trainer closes the iterator or exits normally. A trainer killed outright
(SIGKILL: an OOM kill, a node failure) does neither, and its workers would wait on their full queues for ever,
holding their memory and keeping multiprocessing's resource tracker alive, so that the shared memory of the run
(grain's queues, semaphores and batches, the top-down slots) stayed in /dev/shm too.
"""
import multiprocessing
import os
import threading

import cv2


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
  # every worker share and which unlinks it all when the last of them has exited, i.e. now.
  os._exit(1)   # pylint: disable=protected-access


def exit_with_parent() -> None:
  """Makes this process exit when the process that started it (through multiprocessing) is gone."""
  parent = multiprocessing.parent_process()
  if parent is None:        # not a multiprocessing child
    return
  threading.Thread(target=_exit_when_parent_is_gone, args=(parent,), name="exit-with-trainer", daemon=True).start()


def init_worker() -> None:
  """The start of every worker process (grain's `worker_init_fn`)."""
  cv2.setNumThreads(1)     # one core per worker; cv2's own threads would oversubscribe
  exit_with_parent()
