"""Reusable shared-memory slots for handing finished batches from worker processes to the main process.

A fresh shared-memory segment per element (grain's default transport) costs a page fault per 4 KiB page on both
sides, more CPU than the augmentation itself for 800 KB training examples. Here each worker keeps a pool of
segments and a one-byte-per-slot control segment: the worker writes a chunk into a free slot and sends only its
descriptor; the main process maps the slot once (cached) and builds numpy views on it; when the last view of a chunk
is garbage (including any array that borrowed its memory, e.g. a zero-copy `jax.device_put` on CPU), a finaliser
marks the slot free again. A slot is never reused while anything still refers to it.

When every slot is in use (a consumer holding many batches), the worker falls back to a fresh segment per chunk.

The main process unlinks each segment's name as soon as it has mapped it: the memory stays while either process
maps it, and goes with the last mapping, which the kernel removes when a process ends, however it ends. So once
mapped, no crash of the main process, of a worker or of both together leaves a slot in /dev/shm.
"""
import mmap
import multiprocessing.util
import threading
import weakref
from multiprocessing import shared_memory
from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np

_ALIGN = 64


def layout(arrays: Dict[str, Tuple[Sequence[int], Any]]):
  """{name: (shape, dtype)} -> ({name: (offset, shape, dtype str)}, total bytes), each array 64-byte aligned."""
  offset, out = 0, {}
  for name, (shape, dtype) in arrays.items():
    dtype = np.dtype(dtype)
    out[name] = (offset, tuple(int(s) for s in shape), dtype.str)
    offset += -(-int(np.prod(shape)) * dtype.itemsize // _ALIGN) * _ALIGN
  return out, max(offset, 1)


def views(buffer, arrays) -> Dict[str, np.ndarray]:
  """numpy views on `buffer` (a uint8 ndarray) for a layout's arrays."""
  return {name: buffer[offset:offset + int(np.prod(shape)) * np.dtype(dtype).itemsize].view(dtype).reshape(shape)
          for name, (offset, shape, dtype) in arrays.items()}


class SlotPool:
  """Worker side: up to `max_slots` segments of `nbytes`, reused once the main process releases them."""

  def __init__(self, nbytes: int, max_slots: int = 8):
    self.nbytes = int(nbytes)
    self.max_slots = int(max_slots)
    self.control = shared_memory.SharedMemory(create=True, size=self.max_slots)
    self.flags = np.ndarray((self.max_slots,), np.uint8, buffer=self.control.buf)
    self.flags[:] = 0
    self.slots = []
    # Slots the main process never mapped (and so never unlinked) are unlinked when the worker ends normally.
    multiprocessing.util.Finalize(self, SlotPool._unlink, args=(self.control, self.slots), exitpriority=10)

  def acquire(self) -> Optional[Tuple[Dict[str, Any], np.ndarray]]:
    """A free slot: (descriptor, uint8 buffer of nbytes), or None when all are in use."""
    free = np.flatnonzero(self.flags[:len(self.slots)] == 0)
    if len(free):
      k = int(free[0])
    elif len(self.slots) < self.max_slots:
      self.slots.append(shared_memory.SharedMemory(create=True, size=self.nbytes))
      k = len(self.slots) - 1
    else:
      return None
    self.flags[k] = 1
    buffer = np.ndarray((self.nbytes,), np.uint8, buffer=self.slots[k].buf)
    return dict(control=self.control.name, name=self.slots[k].name, index=k, nbytes=self.nbytes), buffer

  @staticmethod
  def _unlink(control, slots) -> None:
    for shm in [control] + list(slots):
      try:
        shm.unlink()
      except FileNotFoundError:
        pass


def _release(flags: np.ndarray, index: int, *segments) -> None:
  """Frees a slot. `segments` (the slot's and the control's SharedMemory) are passed only to stay open, i.e. mapped,
  for as long as any array on them exists: closing a segment unmaps it even under live numpy arrays."""
  del segments
  flags[index] = 0


class LocalSlots:
  """The same reuse within one process (no workers, or worker threads): chunk buffers whose memory is recycled
  once nothing refers to a chunk any more, instead of fresh allocations that fault in every page again."""

  def __init__(self, nbytes: int, max_slots: int = 8):
    self.nbytes = int(nbytes)
    self.max_slots = int(max_slots)
    self.flags = np.zeros(self.max_slots, np.uint8)
    self.maps = []
    self.lock = threading.Lock()

  def buffer(self) -> np.ndarray:
    """A uint8 array of nbytes; views of it keep its memory from reuse until they are all gone."""
    with self.lock:
      free = np.flatnonzero(self.flags[:len(self.maps)] == 0)
      if len(free):
        k = int(free[0])
      elif len(self.maps) < self.max_slots:
        self.maps.append(mmap.mmap(-1, self.nbytes))
        k = len(self.maps) - 1
      else:
        return np.empty(self.nbytes, np.uint8)
      self.flags[k] = 1
    # The array does not own the mapping, so every view of it keeps *this* array alive.
    owner = np.frombuffer(self.maps[k], np.uint8, count=self.nbytes)
    weakref.finalize(owner, _release, self.flags, k)
    return owner

  def __getstate__(self):
    return dict(nbytes=self.nbytes, max_slots=self.max_slots)

  def __setstate__(self, state):
    self.__init__(state["nbytes"], state["max_slots"])


class SlotReader:
  """Main side: maps slots by name (once, then unlinks the name) and returns buffers whose garbage collection frees
  the slot."""

  def __init__(self):
    self._segments: Dict[str, shared_memory.SharedMemory] = {}
    self._flags: Dict[str, np.ndarray] = {}

  def _open(self, name: str) -> shared_memory.SharedMemory:
    shm = self._segments.get(name)
    if shm is None:
      shm = self._segments[name] = shared_memory.SharedMemory(name=name)
      shm.unlink()   # see the module docstring: the worker and this process keep their mappings
    return shm

  def buffer(self, descriptor: Dict[str, Any]) -> np.ndarray:
    """The slot's bytes as a uint8 array; views of it keep the slot in use until they are all gone."""
    control = descriptor["control"]
    if control not in self._flags:
      self._flags[control] = np.ndarray((self._open(control).size,), np.uint8, buffer=self._open(control).buf)
    segment = self._open(descriptor["name"])
    owner = np.ndarray((descriptor["nbytes"],), np.uint8, buffer=segment.buf)
    weakref.finalize(owner, _release, self._flags[control], int(descriptor["index"]), segment, self._open(control))
    return owner
