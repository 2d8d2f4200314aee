"""Devices, meshes and batches: data parallelism over every device of every process.

- `initialize_distributed` starts `jax.distributed` from explicit flags, the `JAX_COORDINATOR_ADDRESS` /
  `JAX_NUM_PROCESSES` / `JAX_PROCESS_ID` variables, or a cluster JAX detects by itself (SLURM, Open MPI, TPU pods),
  and does nothing on a single machine. It must run before anything touches a JAX device.
- `make_mesh` builds a 1-D mesh with axis 'data' over `jax.devices()` (all processes).
- Each process loads `batch_size // process_count` samples; `host_to_global` turns those host-local numpy arrays
  into one global `jax.Array` sharded along the batch axis (`jax.make_array_from_process_local_data`).
- `replicate_from_host` places arrays that every process holds in full (parameters, evaluation batches).
"""
import os
from typing import Any, Optional, Sequence

from absl import logging
import jax
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec
import numpy as np

DATA_AXIS = "data"


def _int_env(name: str) -> int:
  try:
    return int(os.environ.get(name, "0").split("(")[0])
  except ValueError:
    return 0


def cluster_in_environment() -> Optional[str]:
  """The name of the multi-process launcher this process runs under, or None on a single machine."""
  if "SLURM_JOB_ID" in os.environ and max(_int_env("SLURM_STEP_NUM_TASKS"), _int_env("SLURM_NTASKS")) > 1:
    return "slurm"
  if _int_env("OMPI_COMM_WORLD_SIZE") > 1:
    return "openmpi"
  if len([h for h in os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1:
    return "tpu"
  if "MEGASCALE_COORDINATOR_ADDRESS" in os.environ:
    return "tpu"
  return None


def initialize_distributed(coordinator_address: str = "", num_processes: int = 0, process_id: int = -1,
                           local_device_ids: Sequence[int] = ()) -> None:
  """Joins the processes of a multi-host run; a no-op when there is only this one.

  Explicit arguments (the `--coordinator_address`, `--num_processes`, `--process_id` flags) win, then the
  `JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID` environment variables, then the cluster's own
  variables (SLURM, Open MPI, TPU), which `jax.distributed.initialize()` reads itself.
  """
  coordinator_address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS", "")
  num_processes = num_processes or _int_env("JAX_NUM_PROCESSES")
  if process_id < 0 and "JAX_PROCESS_ID" in os.environ:
    process_id = _int_env("JAX_PROCESS_ID")
  if coordinator_address:
    if num_processes <= 0 or process_id < 0:
      raise ValueError(f"a coordinator address ({coordinator_address}) needs --num_processes and --process_id "
                       f"(got {num_processes} and {process_id})")
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id, local_device_ids=list(local_device_ids) or None)
  elif (cluster := cluster_in_environment()) is not None:
    logging.info("Initialising jax.distributed from the %s environment", cluster)
    jax.distributed.initialize()
  else:
    return
  logging.info("Process %d of %d; %d local devices, %d in all", jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count())


def make_mesh(devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """A 1-D data-parallel mesh over `devices` (default: every device of every process)."""
  devices = np.asarray(jax.devices() if devices is None else devices)
  return Mesh(devices.reshape(-1), (DATA_AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Arrays whose leading (batch) axis is split over the 'data' axis."""
  return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def per_process_batch_size(global_batch_size: int, mesh: Mesh, accum_steps: int = 1) -> int:
  """The number of samples each process loads; checks the global batch splits evenly over the devices and, on
  every device, into `accum_steps` micro-batches (`config.train.grad_accum_steps`)."""
  devices = mesh.devices.size
  if accum_steps < 1:
    raise ValueError(f"config.train.grad_accum_steps={accum_steps}: must be >= 1")
  if global_batch_size % (devices * accum_steps):
    raise ValueError(f"config.train.batch_size={global_batch_size} must be a multiple of devices ({devices}) x "
                     f"grad_accum_steps ({accum_steps})")
  return global_batch_size // jax.process_count()


def host_to_global(batch: Any, mesh: Mesh) -> Any:
  """Host-local numpy batches (this process's share) -> global arrays sharded along the batch axis."""
  sharding = batch_sharding(mesh)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch)


def _put_full(tree: Any, sharding: NamedSharding) -> Any:
  """Arrays every process holds in full -> global arrays laid out by `sharding` (each device takes its slice)."""
  def put(x):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])
  return jax.tree.map(put, tree)


def replicate_from_host(tree: Any, mesh: Mesh) -> Any:
  """Arrays every process holds in full (the same values everywhere) -> replicated global arrays."""
  return _put_full(tree, replicated(mesh))


def shard_full_batch(batch: Any, mesh: Mesh) -> Any:
  """Arrays every process holds in full -> global arrays sharded along the batch axis.

  Used for evaluation, where each process has the whole batch; the leading size must divide by the device count
  (see `pad_batch`).
  """
  return _put_full(batch, batch_sharding(mesh))


def pad_batch(array: np.ndarray, multiple: int) -> np.ndarray:
  """Pads the leading axis with copies of the last sample up to a multiple of `multiple`."""
  n = array.shape[0]
  pad = -n % multiple
  if pad == 0:
    return array
  return np.concatenate([array, np.repeat(array[-1:], pad, axis=0)], axis=0)


def local_value(x: Any) -> np.ndarray:
  """A replicated (or fully addressable) array as numpy on this process, without communication."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return np.asarray(x.addressable_data(0))
  return np.asarray(x)


def local_copy(tree: Any) -> Any:
  """`local_value` of every leaf: host copies of replicated state."""
  return jax.tree.map(local_value, tree)


def _every_process(value, dtype) -> np.ndarray:
  """Every process's scalar `value`, on every process (a small all-gather; no communication with one process)."""
  if jax.process_count() == 1:
    return np.asarray([value], dtype)
  return np.asarray(multihost_utils.process_allgather(np.asarray([value], dtype))).reshape(-1)


def any_process(flag: bool) -> bool:
  """True on every process when `flag` is true on at least one."""
  return bool(_every_process(int(flag), np.int32).max())


def min_over_processes(value: float) -> float:
  """The smallest of every process's `value`, on every process."""
  return float(_every_process(value, np.float64).min())
