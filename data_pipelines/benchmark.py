"""Input-pipeline benchmark: training samples per second and per CPU core (JPEG decode + augmentation + targets).

    python -m data_pipelines.benchmark --config configs/eeffpose_p0.py --workers 0 --workers 1 --workers 2 \
        --output data_bench.json

reads the real COCO samples of ../shared/data/samples/coco unless --annotations/--images say otherwise, runs
`train_loader` with each worker count, and reports for each: samples/s (wall clock), the CPU seconds all of the
pipeline's processes used (main process and workers, from /proc), and samples per CPU-second, the per-core figure
that a busy shared machine distorts least. Nothing is trained: the batches are only pulled.
"""
import json
import os
import platform
import sys
import time
from typing import Any, Dict, List, Optional

from absl import app
from absl import flags
from absl import logging
import cv2
from ml_collections import config_flags

from data_pipelines import topdown
from meme_jax import config as config_lib
from meme_jax import tasks

FLAGS = flags.FLAGS
# The original PyTorch pipeline (HRNet JointsDataset + DataLoader) on one core of the 2-core CI machine type, on the
# same sample images: the figure the speed goal is stated against.
ORIGINAL_SAMPLES_PER_CORE = 169.0


def default_samples_dir() -> str:
  shared = os.environ.get("MEME_JAX_SHARED", os.path.join(os.path.dirname(config_lib.REPO_ROOT), "shared"))
  return os.path.join(shared, "data", "samples", "coco")


def _clock_ticks() -> float:
  return float(os.sysconf("SC_CLK_TCK"))


def _process_cpu_seconds(pid: int) -> float:
  """utime + stime of a process from /proc (0 if it is gone)."""
  try:
    with open(f"/proc/{pid}/stat", "r") as f:
      fields = f.read().rsplit(")", 1)[1].split()
  except OSError:
    return 0.0
  return (int(fields[11]) + int(fields[12])) / _clock_ticks()


def _descendants(pid: int) -> List[int]:
  children: Dict[int, List[int]] = {}
  for entry in os.listdir("/proc"):
    if not entry.isdigit():
      continue
    try:
      with open(f"/proc/{entry}/stat", "r") as f:
        ppid = int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
      continue
    children.setdefault(ppid, []).append(int(entry))
  out, todo = [], [pid]
  while todo:
    p = todo.pop()
    for c in children.get(p, []):
      out.append(c)
      todo.append(c)
  return out


def pipeline_cpu_seconds() -> Dict[int, float]:
  """CPU seconds used so far by this process and each of its descendants (worker processes), by pid."""
  me = os.getpid()
  if not os.path.exists(f"/proc/{me}/stat"):
    return {me: time.process_time()}
  return {pid: _process_cpu_seconds(pid) for pid in [me] + _descendants(me)}


def machine_info() -> Dict[str, Any]:
  model = platform.processor() or ""
  try:
    with open("/proc/cpuinfo", "r") as f:
      for line in f:
        if line.startswith("model name"):
          model = line.split(":", 1)[1].strip()
          break
  except OSError:
    pass
  info = dict(cpu_model=model, cpu_count=os.cpu_count(), python=platform.python_version(),
              platform=platform.platform())
  try:
    info["cpu_affinity"] = len(os.sched_getaffinity(0))
    info["load_average_1min"] = os.getloadavg()[0]
  except (AttributeError, OSError):
    pass
  info["opencv"] = cv2.__version__
  return info


def measure_train_pipeline(config, num_workers: int, num_samples: int, *, batch_size: Optional[int] = None,
                           warmup_batches: Optional[int] = None) -> Dict[str, Any]:
  """Pulls `num_samples` training samples through `train_loader(config)` with `num_workers` workers (0: all in this
  process) and returns JSON-able figures: samples_per_s (wall), cpu_seconds (all the pipeline's processes),
  samples_per_cpu_s (per core), per_worker (samples_per_s / workers), speedup over the original's 169/s/core."""
  if tasks.model_family(config) != "topdown":
    raise ValueError(f"config {config.get('name', '?')!r} is a {tasks.model_family(config) or 'non-top-down'} "
                     "model: the input-pipeline benchmark measures the top-down (person crop) pipeline only")
  batch_size = int(batch_size or config.train.batch_size)
  records = topdown.load_records(config, "train")
  loader = topdown.train_loader(config, seed=0, shard_index=0, shard_count=1, batch_size_per_process=batch_size,
                                num_workers=num_workers, records=records)
  cv2_threads = cv2.getNumThreads()
  if num_workers == 0:
    cv2.setNumThreads(1)    # all in this process on one core: no cv2 helper threads either
  iterator = iter(loader)
  try:
    # Warm-up: worker start-up and filled prefetch buffers are not part of the steady state.
    for _ in range(warmup_batches if warmup_batches is not None else 2 + 2 * num_workers):
      next(iterator)
    num_batches = max(1, -(-int(num_samples) // batch_size))
    cpu0, t0 = pipeline_cpu_seconds(), time.perf_counter()
    for _ in range(num_batches):
      batch = next(iterator)
    seconds = time.perf_counter() - t0
    cpu1 = pipeline_cpu_seconds()
  finally:
    iterator.close()
    cv2.setNumThreads(cv2_threads)
  cpu = sum(v - cpu0.get(pid, 0.0) for pid, v in cpu1.items())
  main_cpu = cpu1[os.getpid()] - cpu0[os.getpid()]
  samples = num_batches * batch_size
  per_cpu = samples / cpu if cpu > 0 else float("nan")
  num_images = len({r["image_file"] for r in records})
  data = config.data
  return dict(
      workers=int(num_workers), worker_type=str(data.get("worker_type", "process")) if num_workers else "none",
      samples=samples, batch_size=batch_size, seconds=seconds, samples_per_s=samples / seconds,
      per_worker_samples_per_s=samples / seconds / max(1, num_workers), cpu_seconds=cpu,
      samples_per_cpu_s=per_cpu, speedup_per_core_vs_original=per_cpu / ORIGINAL_SAMPLES_PER_CORE,
      main_process_cpu_seconds=main_cpu, worker_cpu_seconds=cpu - main_cpu, cpu_utilisation=cpu / seconds,
      group_by_image=bool(data.get("group_by_image", True)),
      chunk_size=int(data.get("chunk_size", topdown.DEFAULT_CHUNK_SIZE)), records=len(records), images=num_images,
      persons_per_image=len(records) / num_images, image_size=list(data.image_size),
      heatmap_size=list(data.heatmap_size), batch_shapes={k: list(v.shape) for k, v in batch.items()},
      machine=machine_info())


def define_flags() -> None:
  """The command line's flags (in absl's global flags: scripts/benchmark.py imports this module and has its own)."""
  config_flags.DEFINE_config_file("config", os.path.join(config_lib.REPO_ROOT, "configs", "eeffpose_p0.py"),
                                  "configs/NAME.py[:ARG] whose training pipeline is measured", lock_config=False)
  flags.DEFINE_multi_integer("workers", [0, 1, 2], "worker counts to measure (repeat the flag)", lower_bound=0)
  flags.DEFINE_integer("samples", 1536, "samples timed per worker count", lower_bound=1)
  flags.DEFINE_integer("batch_size", 0, "default: config.train.batch_size", lower_bound=0)
  flags.DEFINE_string("annotations", "", "COCO-format json (default: the shared COCO samples)")
  flags.DEFINE_string("images", "", "image folder (default: the shared COCO samples)")
  flags.DEFINE_bool("per_person", False, "decode per person (data.group_by_image=False, the original's sampling order)")
  flags.DEFINE_enum("worker_type", "process", ("process", "thread"), "what the workers are")
  flags.DEFINE_integer("repeats", 1, "measure each worker count this many times and keep the fastest (busy machines)",
                       lower_bound=1)
  flags.DEFINE_string("output", "", "write the figures here as JSON")


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  logging.set_verbosity(logging.WARNING)
  config = FLAGS.config
  samples = default_samples_dir()
  config.data.format = "coco"
  if config.data.dataset == "synthetic":
    config.data.dataset = "coco"
  config.data.train_annotations = FLAGS.annotations or os.path.join(samples, "test_coco.json")
  config.data.train_images = FLAGS.images or samples
  config.data.group_by_image = not FLAGS.per_person
  config.data.worker_type = FLAGS.worker_type
  results = dict(config=config_flags.get_config_filename(FLAGS["config"]), annotations=config.data.train_annotations,
                 original_samples_per_core=ORIGINAL_SAMPLES_PER_CORE, command=" ".join(sys.argv), runs=[])
  for workers in FLAGS.workers:
    trials = [measure_train_pipeline(config, workers, FLAGS.samples, batch_size=FLAGS.batch_size or None)
              for _ in range(FLAGS.repeats)]
    figures = max(trials, key=lambda r: r["samples_per_s"])
    figures["trials"] = [{k: r[k] for k in ("samples_per_s", "samples_per_cpu_s", "cpu_utilisation")}
                         for r in trials]
    results["runs"].append(figures)
    print(f"workers={workers}: {figures['samples_per_s']:.0f} samples/s, {figures['samples_per_cpu_s']:.0f} "
          f"samples/s per core ({figures['speedup_per_core_vs_original']:.2f}x the original's "
          f"{ORIGINAL_SAMPLES_PER_CORE:.0f}), CPU {figures['cpu_utilisation']:.2f} cores", flush=True)
  runs = {r["workers"]: r for r in results["runs"]}
  if 1 in runs and 2 in runs:
    results["scaling_1_to_2_workers"] = runs[2]["samples_per_s"] / runs[1]["samples_per_s"]
    print(f"1 -> 2 workers: x{results['scaling_1_to_2_workers']:.2f} samples/s")
  if FLAGS.output:
    with open(FLAGS.output, "w") as f:
      json.dump(results, f, indent=2)


if __name__ == "__main__":
  define_flags()
  app.run(main, argv=config_lib.resolve_config_argument(sys.argv))
