#!/usr/bin/env python
"""Speed, compile time and memory of a config's model on the current device, as JSON (medians).

  # model: parameter count, inference at each batch size, the real trainer's train step, compile times
  python scripts/benchmark.py model --config configs/eeffpose_p0.py --train-batch 64 --precision bfloat16 \
      --infer-batches 1 256 --output p0.json
  # the training input pipeline (JPEG decode + augmentation + targets) per CPU core
  python scripts/benchmark.py data --config configs/eeffpose_p0.py --workers 1 2 --output data.json

Inputs are synthetic on-device tensors, so `model` measures the network and the train step alone; compare with
`data` to see whether the input pipeline can feed it. Timings block on the results (`block_until_ready`) and are
medians over `--steps` repetitions after a warm-up; compile times are measured separately (ahead-of-time
`lower().compile()`), so they never pollute the step times. `--compilation-cache DIR` enables JAX's persistent
compilation cache to measure warm compiles.
"""
import argparse
import json
import os
import platform
import statistics
import sys
import time

import numpy as np

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
  sys.path.insert(0, REPO_ROOT)


def _device_info():
  import jax  # pylint: disable=import-outside-toplevel
  device = jax.devices()[0]
  return dict(backend=jax.default_backend(), device_kind=device.device_kind, device_count=jax.device_count(),
              process_count=jax.process_count(), jax_version=jax.__version__, host=platform.node(),
              cpu_count=os.cpu_count(), python=platform.python_version())


def _peak_memory_bytes():
  import jax  # pylint: disable=import-outside-toplevel
  stats = jax.devices()[0].memory_stats() or {}
  return stats.get("peak_bytes_in_use")


def _median_time(fn, steps: int, warmup: int = 2):
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times), times


def _config(spec: str, overrides):
  import meme_jax  # pylint: disable=import-outside-toplevel
  config = meme_jax.load_config(spec)
  for item in overrides or []:
    key, _, value = item.partition("=")
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = type(node[leaf])(json.loads(value)) if not isinstance(node[leaf], str) else value
  return config


def benchmark_inference(config, batch_sizes, steps: int):
  """Inference (`train=False`) throughput and latency per batch size, with its compile time."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from meme_jax import train  # pylint: disable=import-outside-toplevel

  task = train.get_task(config)
  model = task.build_model(config)
  variables = train.initial_variables(model, config, jax.random.PRNGKey(0))
  variables = jax.device_put(variables)
  apply_fn = jax.jit(train.make_apply_fn(model))
  results = []
  for batch in batch_sizes:
    images = jnp.asarray(np.random.default_rng(0).normal(size=(batch,) + train.input_shape(config)), jnp.float32)
    start = time.perf_counter()
    compiled = apply_fn.lower(variables, images).compile()
    compile_s = time.perf_counter() - start
    run = lambda: jax.block_until_ready(compiled(variables, images))  # noqa: E731
    median, times = _median_time(run, steps)
    results.append(dict(batch_size=batch, compile_s=compile_s, median_s=median, images_per_s=batch / median,
                        latency_ms=1000 * median, times_s=times))
  return results


def benchmark_train_step(config, batch_size: int, steps: int):
  """The trainer's own jitted, sharded, donated train step on synthetic on-device batches."""
  import jax  # pylint: disable=import-outside-toplevel
  from meme_jax import parallel, schedules, train  # pylint: disable=import-outside-toplevel

  config = train.training_config(config)
  task = train.get_task(config)
  model = task.build_model(config)
  mesh = parallel.make_mesh()
  tx = schedules.make_optimizer(config.train)
  variables = train.initial_variables(model, config, jax.random.PRNGKey(0))
  state = train.create_state(variables, tx, jax.random.PRNGKey(1), mesh)
  accum = int(config.train.get("grad_accum_steps", 1))
  step_fn = train.jit_train_step(train.make_train_step(model, task, tx, accum_steps=accum, mesh=mesh), state, mesh)
  rng = np.random.default_rng(0)
  shapes = train.task_batch_shapes(task, config, batch_size)
  batch = {}
  for key, (shape, dtype) in shapes.items():
    if key not in task.batch_keys:
      continue
    if np.issubdtype(np.dtype(dtype), np.integer):
      batch[key] = np.zeros(shape, dtype)
    else:
      batch[key] = rng.uniform(0.0, 1.0, size=shape).astype(dtype)
  batch = parallel.shard_full_batch(batch, mesh)
  start = time.perf_counter()
  compiled = step_fn.lower(state, batch).compile()
  compile_s = time.perf_counter() - start
  holder = {"state": state}

  def run():
    new_state, metrics, finite = compiled(holder["state"], batch)
    holder["state"] = new_state
    jax.block_until_ready((new_state.params, finite))

  median, times = _median_time(run, steps)
  return dict(batch_size=batch_size, precision=config.model.get("dtype", "float32"), compile_s=compile_s,
              median_s=median, images_per_s=batch_size / median, times_s=times,
              peak_memory_bytes=_peak_memory_bytes())


def parameter_count(config) -> int:
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from meme_jax import train  # pylint: disable=import-outside-toplevel
  model = train.get_task(config).build_model(config)
  dummy = jax.ShapeDtypeStruct((1,) + train.input_shape(config), jnp.float32)
  shapes = jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x, train=False), dummy)
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(shapes["params"])))


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="mode", required=True)
  model_p = sub.add_parser("model", help="parameters, inference and train-step speed, compile time, memory")
  model_p.add_argument("--config", required=True)
  model_p.add_argument("--set", nargs="*", default=[], help="config overrides key=value (JSON values)")
  model_p.add_argument("--train-batch", type=int, default=16, help="global train batch; 0 skips the train step")
  model_p.add_argument("--precision", default="", help="float32 | bfloat16 (default: the config's)")
  model_p.add_argument("--infer-batches", type=int, nargs="*", default=[1, 16])
  model_p.add_argument("--steps", type=int, default=10)
  model_p.add_argument("--compilation-cache", default="", help="persistent compilation cache directory")
  model_p.add_argument("--output", default="")
  data_p = sub.add_parser("data", help="training input pipeline samples/s per CPU core")
  data_p.add_argument("--config", required=True)
  data_p.add_argument("--workers", type=int, nargs="*", default=[1, 2])
  data_p.add_argument("--samples", type=int, default=512)
  data_p.add_argument("--output", default="")
  args = parser.parse_args(argv)

  if args.mode == "data":
    from data_pipelines import benchmark as data_benchmark  # pylint: disable=import-outside-toplevel
    config = _config(args.config, [])
    result = dict(mode="data", config=args.config,
                  runs=[data_benchmark.measure_train_pipeline(config, num_workers=w, num_samples=args.samples)
                        for w in args.workers])
  else:
    if args.compilation_cache:
      import jax  # pylint: disable=import-outside-toplevel
      jax.config.update("jax_compilation_cache_dir", args.compilation_cache)
      jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
      jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    config = _config(args.config, args.set)
    if args.precision:
      config.train.mixed_precision = args.precision
    result = dict(mode="model", config=args.config, overrides=args.set, device=_device_info(),
                  parameters=parameter_count(config))
    result["inference"] = benchmark_inference(config, args.infer_batches, args.steps)
    if args.train_batch:
      result["train_step"] = benchmark_train_step(config, args.train_batch, args.steps)
  text = json.dumps(result, indent=2)
  print(text)
  if args.output:
    with open(args.output, "w", encoding="utf-8") as f:
      f.write(text + "\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())
