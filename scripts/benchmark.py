#!/usr/bin/env python
"""Speed, compile time and memory of a config's model on the current device, as JSON (medians).

  # model: parameter count, inference at each batch size, the real trainer's train step, compile times
  python scripts/benchmark.py model --config configs/eeffpose_p0.py --train_batch 64 --precision bfloat16 \
      --infer_batches 1 --infer_batches 256 --output p0.json
  # the training input pipeline (JPEG decode + augmentation + targets) per CPU core
  python scripts/benchmark.py data --config configs/eeffpose_p0.py --workers 1 --workers 2 --output data.json
  # the ONNX export in onnxruntime (CPU) against the JAX forward, same weights, same machine, same run
  python scripts/benchmark.py export --config configs/eeffpose_p0.py --infer_batches 1 --infer_batches 8

Inputs are synthetic on-device tensors, so `model` measures the network and the train step alone; compare with
`data` to see whether the input pipeline can feed it. Timings block on the results (`block_until_ready`) and are
medians over `--steps` repetitions after a warm-up; compile times are measured separately (ahead-of-time
`lower().compile()`), so they never pollute the step times. `--compilation_cache DIR` enables JAX's persistent
compilation cache to measure warm compiles. Any config field can be set with `--config.SECTION.FIELD=VALUE`.
Each compiled program also reports XLA's `memory_analysis()` (`temp_bytes`, the activations and scratch a train
step holds, and `temp_bytes_per_image`) and `cost_analysis()` (`flops`, `bytes_accessed`); `init_s` is the random
initialisation of the model's variables.
"""
import json
import os
import platform
import statistics
import sys
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np

from data_pipelines import benchmark as data_benchmark
from meme_jax import config as config_lib
from meme_jax import aot, parallel, schedules, tasks, train

MODES = ("model", "data", "export")
FLAGS = flags.FLAGS

config_flags.DEFINE_config_file("config", None, "configs/NAME.py[:ARG] to measure", lock_config=False)
flags.DEFINE_string("output", "", "also write the JSON here")
flags.DEFINE_integer("train_batch", 16, "model: global train batch; 0 skips the train step", lower_bound=0)
flags.DEFINE_string("precision", "", "model: float32 | bfloat16 (default: the config's)")
flags.DEFINE_multi_integer("infer_batches", [1, 16], "model, export: inference batch sizes (repeat the flag)",
                            lower_bound=1)
flags.DEFINE_integer("steps", 10, "model: timed repetitions of each step", lower_bound=1)
flags.DEFINE_string("compilation_cache", "", "model: persistent compilation cache directory")
flags.DEFINE_multi_integer("workers", [1, 2], "data: worker counts to measure (repeat the flag)", lower_bound=0)
flags.DEFINE_integer("samples", 512, "data: samples timed per worker count", lower_bound=1)
flags.mark_flag_as_required("config")


def _device_info():
  device = jax.devices()[0]
  return dict(backend=jax.default_backend(), device_kind=device.device_kind, device_count=jax.device_count(),
              process_count=jax.process_count(), jax_version=jax.__version__, host=platform.node(),
              cpu_count=os.cpu_count(), python=platform.python_version())


def _peak_memory_bytes():
  stats = jax.devices()[0].memory_stats() or {}
  return stats.get("peak_bytes_in_use")


def _compiled_costs(compiled, batch_size: int):
  """`aot.compiled_costs`, with the temporaries per image."""
  costs = aot.compiled_costs(compiled)
  costs["temp_bytes_per_image"] = costs["temp_bytes"] // max(batch_size, 1)
  return costs


def _median_time(fn, steps: int, warmup: int = 2):
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times), times


def benchmark_inference(config, batch_sizes, steps: int):
  """Inference (`train=False`) throughput and latency per batch size, with its compile time."""
  task = tasks.get_task(config)
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
                        latency_ms=1000 * median, times_s=times, **_compiled_costs(compiled, batch)))
  return results


def benchmark_train_step(config, batch_size: int, steps: int):
  """The trainer's own jitted, sharded, donated train step on synthetic on-device batches."""
  config = train.training_config(config)
  task = tasks.get_task(config)
  model = task.build_model(config)
  mesh = parallel.make_mesh()
  tx = schedules.make_optimizer(config.train)
  start = time.perf_counter()
  variables = train.initial_variables(model, config, jax.random.PRNGKey(0))
  init_s = time.perf_counter() - start
  state = train.create_state(variables, tx, jax.random.PRNGKey(1), mesh)
  accum = int(config.train.get("grad_accum_steps", 1))
  step_fn = train.jit_train_step(train.make_train_step(model, task, tx, accum_steps=accum, mesh=mesh), state, mesh)
  rng = np.random.default_rng(0)
  shapes = task.batch_shapes(batch_size)
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
  return dict(batch_size=batch_size, precision=config.model.get("dtype", "float32"), init_s=init_s,
              compile_s=compile_s, median_s=median, images_per_s=batch_size / median, times_s=times,
              peak_memory_bytes=_peak_memory_bytes(), **_compiled_costs(compiled, batch_size))


def benchmark_export(config, batch_sizes, steps: int):
  """onnxruntime on the ONNX export (dynamic batch, float32) against the JAX forward the predictor runs."""
  # onnxruntime and the ONNX writer are the [export] extra's; the other modes do not need them.
  import onnxruntime  # pylint: disable=import-outside-toplevel
  from meme_jax.export import model as export_lib  # pylint: disable=import-outside-toplevel
  model = tasks.get_task(config).build_model(config)
  variables = jax.device_get(train.initial_variables(model, config, jax.random.PRNGKey(0)))
  start = time.perf_counter()
  data = export_lib.export_model(config, variables, "onnx", batch=None)
  export_s = time.perf_counter() - start
  options = onnxruntime.SessionOptions()
  session = onnxruntime.InferenceSession(data, options, providers=["CPUExecutionProvider"])
  apply_fn = jax.jit(train.make_apply_fn(model))
  results = []
  for batch in batch_sizes:
    images = np.random.default_rng(0).normal(size=(batch,) + train.input_shape(config)).astype(np.float32)
    nchw = np.ascontiguousarray(np.transpose(images, (0, 3, 1, 2)))
    on_device = jnp.asarray(images)
    compiled = apply_fn.lower(variables, on_device).compile()
    jax_s, _ = _median_time(lambda: jax.block_until_ready(compiled(variables, on_device)), steps)  # noqa: B023
    ort_s, _ = _median_time(lambda: session.run(None, {"images": nchw}), steps)  # noqa: B023
    results.append(dict(batch_size=batch, jax_latency_ms=1000 * jax_s, onnxruntime_latency_ms=1000 * ort_s,
                        jax_images_per_s=batch / jax_s, onnxruntime_images_per_s=batch / ort_s,
                        onnxruntime_speedup=jax_s / ort_s))
  return dict(export_s=export_s, onnx_bytes=len(data), onnxruntime_version=onnxruntime.__version__,
              runs=results)


def parameter_count(config) -> int:
  model = tasks.get_task(config).build_model(config)
  dummy = jax.ShapeDtypeStruct((1,) + train.input_shape(config), jnp.float32)
  shapes = jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x, train=False), dummy)
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(shapes["params"])))


def main(argv) -> None:
  if len(argv) != 2 or argv[1] not in MODES:
    raise app.UsageError(f"give the mode first: {' or '.join(MODES)}")
  mode, config = argv[1], FLAGS.config
  config_file = config_flags.get_config_filename(FLAGS["config"])
  if mode == "data":
    result = dict(mode="data", config=config_file,
                  runs=[data_benchmark.measure_train_pipeline(config, num_workers=w, num_samples=FLAGS.samples)
                        for w in FLAGS.workers])
  elif mode == "export":
    result = dict(mode="export", config=config_file, overrides=config_flags.get_override_values(FLAGS["config"]),
                  device=_device_info(), parameters=parameter_count(config))
    result["export"] = benchmark_export(config, FLAGS.infer_batches, FLAGS.steps)
  else:
    if FLAGS.compilation_cache:
      jax.config.update("jax_compilation_cache_dir", FLAGS.compilation_cache)
      jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
      jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    if FLAGS.precision:
      config.train.mixed_precision = FLAGS.precision
    result = dict(mode="model", config=config_file, overrides=config_flags.get_override_values(FLAGS["config"]),
                  device=_device_info(), parameters=parameter_count(config))
    result["inference"] = benchmark_inference(config, FLAGS.infer_batches, FLAGS.steps)
    if FLAGS.train_batch:
      result["train_step"] = benchmark_train_step(config, FLAGS.train_batch, FLAGS.steps)
  text = json.dumps(result, indent=2)
  print(text)
  if FLAGS.output:
    with open(FLAGS.output, "w", encoding="utf-8") as f:
      f.write(text + "\n")


if __name__ == "__main__":
  app.run(main, argv=config_lib.resolve_config_argument(sys.argv))
