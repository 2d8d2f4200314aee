"""Ahead-of-time compilation for a device topology one does not have: memory per chip, FLOPs, collectives, and the
largest batch that fits, before a queue slot on a pod is spent.

  python -m meme_jax.main --config configs/eeffpose_p0.py --mode compile --topology v5e:2x4 --workdir DIR
  python -m meme_jax.main --config ... --mode compile --topology v5e:2x4 --num_slices 2 --find_max_batch
  python -m meme_jax.main --config ... --mode compile --topology local      # this machine's own devices

TPU topologies (`v4:2x2x1`, `v5e:2x4`, `v5p:2x2x1`, `v6e:2x4`, ...) need libtpu (`pip install -e ".[tpu]"`) and no
TPU: the devices are compile-only descriptions, and nothing is run. The train step is the trainer's own
(`train.make_train_step` and `jit_train_step`: the same shardings, donation, mixed precision and gradient
accumulation as a real run) and the evaluation forward the one the tasks run, lowered from shapes alone over a mesh
of the topology's devices, for the config's global batch (`config.train.batch_size`, `config.test.batch_size`, or
`--batch_per_chip` times the chips). For each the report gives per-chip argument / output / temporary / peak bytes
(`memory_analysis`), FLOPs and bytes accessed per step (`cost_analysis`), the collective operations of the compiled
program, the compile time, and whether it fits: a program that does not fit fails to compile with
RESOURCE_EXHAUSTED, reported as not fitting, with the batch. `--find_max_batch` searches the largest per-chip batch
that compiles, for training and for inference.

Compiling a real network for a TPU from a small CPU host takes long at XLA's default effort (P0's train step did
not finish in 15 minutes on 2 cores); `--compile_effort=fast` (the default for TPU targets) turns the optimisation
level and the execution-time effort down, which leaves the memory plan as it is and compiles in minutes.
"""
import dataclasses
import json
import math
import os
import re
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

from absl import logging
import jax
from jax.experimental import topologies
import ml_collections
import numpy as np

from meme_jax import parallel
from meme_jax import schedules
from meme_jax import train
from meme_jax.tasks import get_task

# The chip configuration each TPU generation is compiled for (v4 and v5p chips are two cores run as one).
_CHIP_CONFIG = {"v4": "megacore", "v5p": "megacore"}
# HBM per chip, only to aim the first probe of `--find_max_batch`; whether a batch fits is the compiler's answer.
_HBM_BYTES = {"TPU v4": 32 << 30, "TPU v5 lite": 16 << 30, "TPU v5": 95 << 30, "TPU v6 lite": 32 << 30}
_COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all")


class CompileTimeoutError(TimeoutError):
  """A compilation ran past `--compile_timeout_s`."""


def topology_devices(topology: str, num_slices: int = 1) -> List[Any]:
  """The devices of `topology`: 'local' (this machine's), or a TPU topology name such as 'v5e:2x4' or 'v4:2x2x1'."""
  if topology == "local":
    if num_slices != 1:
      raise ValueError("--num_slices applies to TPU topologies, not to --topology local")
    return list(jax.devices())
  match = re.fullmatch(r"(v\d+[a-z]*):(\d+(?:x\d+)+)", topology)
  if not match:
    raise ValueError(f"--topology {topology!r}: expected 'local' or a TPU topology such as v5e:2x4, v4:2x2x1, "
                     f"v5p:2x2x1, v6e:2x4")
  generation, shape = match.group(1), [int(v) for v in match.group(2).split("x")]
  # A host holds up to 2x2 chips; smaller slices are one host.
  bounds = tuple(min(s, 2) if i < 2 else 1 for i, s in enumerate(shape + [1] * (3 - len(shape))))
  try:
    description = topologies.get_topology_desc(topology_name=topology, platform="tpu",
                                               chip_config_name=_CHIP_CONFIG.get(generation, "default"),
                                               chips_per_host_bounds=bounds, num_slices=int(num_slices))
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f"--topology {topology}: no TPU topology description ({str(e).splitlines()[0]}); compiling "
                     f"for a TPU needs libtpu: pip install -e '.[tpu]'") from e
  return list(description.devices)


def _platform(devices) -> str:
  return devices[0].platform


@dataclasses.dataclass
class Compiled:
  """What one compilation says (per chip), or why it did not fit."""
  name: str
  batch_per_chip: int
  fits: bool
  compile_s: float
  argument_bytes: int = 0
  output_bytes: int = 0
  temp_bytes: int = 0
  peak_bytes: int = 0
  flops: float = 0.0
  bytes_accessed: float = 0.0
  collectives: Dict[str, int] = dataclasses.field(default_factory=dict)
  error: str = ""


def _count_collectives(hlo: str) -> Dict[str, int]:
  counts = {}
  for op in _COLLECTIVES:
    n = len(re.findall(rf"\s{op}(?:-start)?\(", hlo))
    if n:
      counts[op] = n
  return counts


def compiled_costs(compiled) -> Dict[str, Any]:
  """XLA's own figures for a compiled program: argument, output and temporary bytes (the temporaries are the
  activations and scratch a train step holds), the peak, FLOPs and bytes accessed per call. Zero where the backend
  does not say."""
  memory = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = (cost[0] if cost else {}) if isinstance(cost, (list, tuple)) else (cost or {})
  out = dict(argument_bytes=0, output_bytes=0, temp_bytes=0, peak_bytes=0,
             flops=float(cost.get("flops", 0.0)), bytes_accessed=float(cost.get("bytes accessed", 0.0)))
  if memory is not None:
    out.update(argument_bytes=int(memory.argument_size_in_bytes), output_bytes=int(memory.output_size_in_bytes),
               temp_bytes=int(memory.temp_size_in_bytes))
    out["peak_bytes"] = int(getattr(memory, "peak_memory_in_bytes", 0) or 0) or (
        out["argument_bytes"] + out["output_bytes"] - int(memory.alias_size_in_bytes) + out["temp_bytes"])
  return out


def _compile(name: str, batch_per_chip: int, lower: Callable[[], Any], timeout_s: float,
             memory_limit: Optional[int]) -> Compiled:
  """Lowers and compiles in a helper thread, logging progress every 30 s; an out-of-memory answer is not fitting."""
  result: Dict[str, Any] = {}

  def work():
    try:
      result["compiled"] = lower().compile()
    except Exception as e:  # pylint: disable=broad-except
      result["error"] = e

  start = time.time()
  worker = threading.Thread(target=work, daemon=True)
  worker.start()
  while worker.is_alive():
    worker.join(timeout=30.0)
    elapsed = time.time() - start
    if worker.is_alive():
      logging.info("compiling %s at %d per chip: %.0fs", name, batch_per_chip, elapsed)
      if timeout_s and elapsed > timeout_s:
        raise CompileTimeoutError(f"compiling {name} at batch {batch_per_chip} per chip took over {timeout_s:.0f}s "
                                  f"(--compile_timeout_s); try --compile_effort=fast or a smaller batch")
  seconds = time.time() - start
  error = result.get("error")
  if error is not None:
    text = str(error)
    if "RESOURCE_EXHAUSTED" not in text and "out of memory" not in text.lower():
      raise error
    line = next((l.strip() for l in text.splitlines() if "memory" in l.lower()), text.splitlines()[0])
    return Compiled(name, batch_per_chip, False, seconds, error=line[:300])
  compiled = result["compiled"]
  costs = compiled_costs(compiled)
  out = Compiled(name, batch_per_chip, True, seconds, collectives=_count_collectives(compiled.as_text()), **costs)
  if memory_limit and out.peak_bytes > memory_limit:
    out.fits = False
    out.error = f"needs {out.peak_bytes / 2**30:.2f} GiB of the device's {memory_limit / 2**30:.2f} GiB"
  return out


class Planner:
  """Compiles the config's train step and evaluation forward for `devices` at any per-chip batch."""

  def __init__(self, config: ml_collections.ConfigDict, devices, *, timeout_s: float = 0.0):
    self.devices = list(devices)
    self.platform = _platform(self.devices)
    config = ml_collections.ConfigDict(config.to_dict())
    config.model.target_platform = self.platform
    self.config = config
    self.mesh = parallel.make_mesh(self.devices)
    self.num_chips = len(self.devices)
    self.timeout_s = timeout_s
    self.task = get_task(config)
    stats = self.devices[0].memory_stats() if self.platform != "tpu" else None
    self.memory_limit = int(stats["bytes_limit"]) if stats and "bytes_limit" in stats else None
    self.device_kind = self.devices[0].device_kind

  def train_step(self, batch_per_chip: int) -> Compiled:
    config = self.config
    accum = int(config.train.get("grad_accum_steps", 1))
    global_batch = batch_per_chip * self.num_chips
    # The same global batch checks and shapes as a run (one process compiles for every host).
    parallel.per_process_batch_size(global_batch, self.mesh, accum)
    model = self.task.build_model(train.training_config(config))
    tx = schedules.make_optimizer(config.train)
    abstract = train.abstract_state(model, config, tx, self.mesh)
    step = train.jit_train_step(train.make_train_step(model, self.task, tx, accum_steps=accum, mesh=self.mesh,
                                                      nan_policy=config.train.get("nan_policy", "stop")),
                                abstract, self.mesh)
    spec = train.batch_spec(self.task, global_batch, self.mesh)
    return _compile("train step", batch_per_chip, lambda: step.lower(abstract, spec), self.timeout_s,
                    self.memory_limit)

  def forward(self, batch_per_chip: int) -> Compiled:
    config = self.config
    model = self.task.build_model(config)
    abstract = train.abstract_state(model, config, schedules.make_optimizer(config.train), self.mesh)
    variables = train.eval_variables(abstract)
    images = jax.ShapeDtypeStruct((batch_per_chip * self.num_chips,) + train.input_shape(config), np.float32,
                                  sharding=parallel.batch_sharding(self.mesh))
    forward = jax.jit(train.make_apply_fn(model), out_shardings=parallel.batch_sharding(self.mesh))
    return _compile("evaluation forward", batch_per_chip, lambda: forward.lower(variables, images), self.timeout_s,
                    self.memory_limit)

  def capacity(self, tried: Dict[int, Compiled]) -> Optional[int]:
    """Bytes per chip: the device's limit, else what an out-of-memory answer named, else the chip's HBM."""
    if self.memory_limit:
      return self.memory_limit
    for c in tried.values():
      match = re.search(r"of ([\d.]+)([KMGT])i?B? hbm", c.error)
      if match:
        return int(float(match.group(1)) * 1024 ** "KMGT".index(match.group(2)) * 1024)
    return _HBM_BYTES.get(self.device_kind)

  def max_batch(self, compile_at: Callable[[int], Compiled], start: int, limit: int = 1 << 20,
                known: Optional[Compiled] = None) -> Tuple[int, List[Compiled]]:
    """The largest per-chip batch that compiles (exact below 512, to 1/256 above). Peak bytes grow about linearly
    with the batch, so the two largest batches that fit predict where the capacity is reached (a secant step),
    which is probed next, kept inside the bracket of the largest batch that fits and the smallest that does not,
    in turn with halving the bracket. `known`: the compilation at `start`, when there is one already."""
    tried: Dict[int, Compiled] = {}
    low, high = 0, None
    b, predicted = max(1, start), False
    while True:
      c = tried[b] = known if known is not None and b == known.batch_per_chip else compile_at(b)
      logging.info("%s at %d per chip: %s (%.0fs)", c.name, b,
                   f"{c.peak_bytes / 2**30:.2f} GiB" if c.fits else "does not fit", c.compile_s)
      if c.fits:
        low = max(low, b)
      else:
        high = b if high is None else min(high, b)
      # Exact below 512 per chip; above, to 1/256 (compiles cost minutes, batches that large differ by little).
      if (high is not None and high - low <= max(1, high // 256)) or low >= limit:
        return low, [tried[k] for k in sorted(tried)]
      guess = None
      fitted = sorted((k, v.peak_bytes) for k, v in tried.items() if v.fits)[-2:]
      capacity = self.capacity(tried)
      if len(fitted) == 2 and capacity and fitted[1][1] > fitted[0][1]:
        (b1, p1), (b2, p2) = fitted
        guess = b2 + int((capacity - p2) * (b2 - b1) / (p2 - p1))
      if high is None:
        # Above the predicted capacity, or at it (then the next batch must fail), or past a wrong prediction.
        if guess is not None and guess > low:
          b = guess
        elif guess is not None and low + 1 not in tried:
          b = low + 1
        else:
          b = 2 * low
        b = min(limit, b)
        continue
      # A prediction on or past an edge of the bracket (the capacity is known to two decimals only) halves it.
      inside = guess is not None and low + 1 < guess < high - 1 and not predicted
      b, predicted = (guess, True) if inside else ((low + high) // 2, False)


def _row(c: Compiled) -> str:
  if not c.fits:
    return f"  {c.name:20s} {c.batch_per_chip:6d}/chip  does not fit: {c.error}  ({c.compile_s:.0f}s)"
  collectives = ", ".join(f"{k} {v}" for k, v in c.collectives.items()) or "none"
  return (f"  {c.name:20s} {c.batch_per_chip:6d}/chip  peak {c.peak_bytes / 2**30:7.2f} GiB (arguments "
          f"{c.argument_bytes / 2**30:.2f}, temporaries {c.temp_bytes / 2**30:.2f})  {c.flops / 1e12:8.3f} TFLOP  "
          f"{c.bytes_accessed / 2**30:8.2f} GiB accessed  compile {c.compile_s:.0f}s  collectives: {collectives}")


def set_compile_effort(effort: str) -> None:
  """'fast': XLA's lowest optimisation level and execution-time effort (same memory plan, minutes instead of
  hours for a TPU target on a small host); 'default': XLA's own."""
  if effort not in ("fast", "default"):
    raise ValueError(f"--compile_effort={effort!r}: expected 'fast' or 'default'")
  if effort == "fast":
    jax.config.update("jax_optimization_level", "O0")
    jax.config.update("jax_exec_time_optimization_effort", -1.0)


def compile_report(config: ml_collections.ConfigDict, topology: str, *, num_slices: int = 1,
                   batch_per_chip: int = 0, infer_batch_per_chip: int = 0, find_max_batch: bool = False,
                   timeout_s: float = 0.0, workdir: Optional[str] = None) -> Dict[str, Any]:
  """Compiles the train step and the evaluation forward of `config` for `topology` (see the module docstring) and
  returns the report (its `summary` lines are what `main` prints; the whole is written to
  WORKDIR/compile_report.json)."""
  devices = topology_devices(topology, num_slices)
  planner = Planner(config, devices, timeout_s=timeout_s)
  chips = planner.num_chips
  train_batch = batch_per_chip or max(1, math.ceil(int(config.train.batch_size) / chips))
  test_batch = infer_batch_per_chip or batch_per_chip or max(
      1, math.ceil(int(config.get("test", {}).get("batch_size", config.train.batch_size)) / chips))
  logging.info("Compiling %s for %s: %d %s chip(s)", config.get("name", ""), topology, chips, planner.device_kind)
  results = [planner.train_step(train_batch), planner.forward(test_batch)]
  report: Dict[str, Any] = dict(config=config.get("name", ""), topology=topology, num_slices=num_slices,
                                chips=chips, device_kind=planner.device_kind, platform=planner.platform,
                                precision=config.train.get("mixed_precision", "float32"),
                                compiled=[dataclasses.asdict(r) for r in results])
  if find_max_batch:
    for key, compile_at, start, known in (("train_step", planner.train_step, train_batch, results[0]),
                                          ("forward", planner.forward, test_batch, results[1])):
      best, tried = planner.max_batch(compile_at, start, known=known)
      report[f"max_batch_per_chip_{key}"] = best
      report.setdefault("search", []).extend(dataclasses.asdict(t) for t in tried)
  lines = [f"{report['config']} on {topology} ({chips} x {planner.device_kind}, {report['precision']}):"]
  lines += [_row(r) for r in results]
  for key in ("train_step", "forward"):
    if f"max_batch_per_chip_{key}" in report:
      lines.append(f"  largest batch per chip that fits, {key.replace('_', ' ')}: "
                   f"{report[f'max_batch_per_chip_{key}']}")
  report["summary"] = lines
  if workdir and jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "compile_report.json"), "w", encoding="utf-8") as f:
      json.dump(report, f, indent=2)
  return report
