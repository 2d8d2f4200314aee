r"""Command line: train, evaluate, or inspect a model from an ml_collections config.

  python -m meme_jax.main --config configs/eeffpose_p0.py:synthetic --workdir /tmp/p0_synthetic
  python -m meme_jax.main --config configs/eeffpose_p0.py --workdir workdir/p0 --config.train.batch_size=32
  python -m meme_jax.main --config configs/eeffpose_p0.py --workdir workdir/p0 --mode evaluate
  python -m meme_jax.main --config configs/eeffpose_p0.py --mode parameters
  python -m meme_jax.main --config configs/eeffpose_p0.py --mode compile --topology v5e:2x4 --workdir DIR

Modes:
  train       train (resuming from the newest complete checkpoint in --workdir), evaluate after each
              `train.eval_every_epochs` epochs and at the end; print the final metric and the mean-pose baseline,
              and write WORKDIR/summary.json.
  evaluate    evaluate the best (--checkpoint=best) or latest checkpoint of --workdir, or `config.init.checkpoint`
              when the workdir has none; write WORKDIR/eval.json.
  baseline    evaluate the mean-pose baseline only.
  parameters  print the parameter table of the model.
  compile     compile the train step and the evaluation forward ahead of time for --topology (a TPU topology from
              any host, or 'local'): memory per chip, FLOPs, collectives, whether it fits; --find_max_batch
              searches the largest batch per chip (`meme_jax.aot`); write WORKDIR/compile_report.json.

Several hosts: start the same command on every host with --coordinator_address=HOST:PORT, --num_processes=N and
--process_id=i (or under SLURM / Open MPI / a TPU pod, where they are read from the environment). Two local CPU
processes as two hosts:

  python -m meme_jax.main --config ... --workdir DIR --coordinator_address=127.0.0.1:12345 \
      --num_processes=2 --process_id=0 &
  python -m meme_jax.main --config ... --workdir DIR --coordinator_address=127.0.0.1:12345 \
      --num_processes=2 --process_id=1
"""
import json
import logging as std_logging
import multiprocessing
import multiprocessing.util
import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from meme_jax import config as config_lib

FLAGS = flags.FLAGS
MODES = ("train", "evaluate", "baseline", "parameters", "compile")

config_flags.DEFINE_config_file(
    "config", None, "Experiment config file, optionally with an argument: configs/NAME.py[:ARG]. Override any "
    "field with --config.SECTION.FIELD=VALUE.", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, TensorBoard events, results and summary.json.")
flags.DEFINE_enum("mode", "train", MODES, "What to do (see the module docstring).")
flags.DEFINE_enum("checkpoint", "best", ("best", "latest"), "Which checkpoint --mode=evaluate uses.")
flags.DEFINE_string("coordinator_address", "", "Multi-host: HOST:PORT of process 0 (jax.distributed).")
flags.DEFINE_integer("num_processes", 0, "Multi-host: the number of processes.")
flags.DEFINE_integer("process_id", -1, "Multi-host: this process's index.")
flags.DEFINE_list("local_device_ids", [], "Multi-host: the local devices this process uses (default: all).")
flags.DEFINE_string("topology", "local", "--mode compile: 'local' (this machine's devices) or a TPU topology such as "
                    "v5e:2x4, v4:2x2x1, v5p:2x2x1, v6e:2x4 (needs libtpu, no TPU).")
flags.DEFINE_integer("num_slices", 1, "--mode compile: slices of --topology.")
flags.DEFINE_integer("batch_per_chip", 0, "--mode compile: training batch per chip (default: config.train.batch_size "
                     "over the chips); also the inference batch unless --infer_batch_per_chip.")
flags.DEFINE_integer("infer_batch_per_chip", 0, "--mode compile: inference batch per chip (default: "
                     "config.test.batch_size over the chips).")
flags.DEFINE_bool("find_max_batch", False, "--mode compile: also search the largest batch per chip that fits.")
flags.DEFINE_float("compile_timeout_s", 0.0, "--mode compile: give up on a compilation after this long (0: never).")
flags.DEFINE_enum("compile_effort", "", ("", "fast", "default"), "--mode compile: XLA's effort; 'fast' (the "
                  "default for TPU topologies) keeps the memory plan and compiles in minutes.")
flags.DEFINE_bool("library_logs", False, "Also show the INFO logs of orbax and grain (checkpoint and data internals).")
flags.DEFINE_string("compilation_cache_dir", "", "JAX's persistent compilation cache: a rerun of the same config "
                    "loads the compiled programs instead of compiling them again (minutes on a CPU). Default: "
                    "WORKDIR/compilation_cache; 'none' turns it off.")

# INFO logs of these libraries describe every checkpoint file and worker; warnings and errors still show.
_LIBRARY_PATHS = (os.sep + "orbax" + os.sep, os.sep + "grain" + os.sep)


class _LibraryInfoFilter(std_logging.Filter):

  def filter(self, record: std_logging.LogRecord) -> bool:
    return record.levelno >= std_logging.WARNING or not any(p in record.pathname for p in _LIBRARY_PATHS)


def _split_host_cpu(num_devices: int) -> None:
  """Exposes the host CPU as `num_devices` XLA devices (`config.train.cpu_devices`), before JAX starts.

  XLA runs most of a convolutional network's many small operations on one thread; as several devices, data
  parallelism keeps that many cores busy (one shard of the batch each). Only the CPU backend is affected, and an
  XLA_FLAGS setting of the user's wins.
  """
  xla_flags = os.environ.get("XLA_FLAGS", "")
  if num_devices > 1 and "xla_force_host_platform_device_count" not in xla_flags:
    os.environ["XLA_FLAGS"] = f"{xla_flags} --xla_force_host_platform_device_count={num_devices}".strip()


def _compile_only_tpu() -> None:
  """For compiling to a TPU topology from this host, before JAX starts: JAX's own backend stays the CPU, and libtpu
  neither asks a TPU metadata server (it would wait on the network) nor looks for worker hosts, nor takes the
  one-process lock that guards real TPUs (compiling touches none, so several compilations may run at once). The
  user's settings of these variables win."""
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")


def _print(text: str) -> None:
  import jax  # pylint: disable=import-outside-toplevel  # after _split_host_cpu, as in `_input_errors`
  if jax.process_index() == 0:
    print(text, flush=True)


def _format_stats(stats) -> str:
  return ", ".join(f"{k} {v:.4f}" for k, v in stats.items())


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  config = FLAGS.config
  if config is None:
    raise app.UsageError("--config is required, e.g. --config configs/eeffpose_p0.py:synthetic")
  _split_host_cpu(int(config.get("train", {}).get("cpu_devices", 0)))
  if FLAGS.mode == "compile" and FLAGS.topology != "local":
    _compile_only_tpu()
  if not FLAGS.library_logs:
    logging.get_absl_handler().addFilter(_LibraryInfoFilter())
  if FLAGS.mode not in ("parameters", "compile") and not FLAGS.workdir:
    raise app.UsageError("--workdir is required for --mode=" + FLAGS.mode)
  cache_dir = FLAGS.compilation_cache_dir
  if not cache_dir and FLAGS.workdir:
    cache_dir = os.path.join(os.path.abspath(FLAGS.workdir), "compilation_cache")
  # Programs compiled for a topology without its devices cannot be read back from the cache: it stays off then.
  if FLAGS.mode == "compile" and FLAGS.topology != "local":
    cache_dir = "none"
  if cache_dir and cache_dir.lower() != "none":
    import jax  # pylint: disable=import-outside-toplevel  # after _split_host_cpu, as in `_input_errors`
    jax.config.update("jax_compilation_cache_dir", cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 2.0)
  try:
    code = _run_mode(config)
  except app.UsageError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    if isinstance(e, _input_errors()):
      # The data or the checkpoint a config names is wrong or missing: the message says what to do; no traceback.
      _exit_with_error(e, 2, traceback=False)
    _exit_with_error(e, 1, traceback=True)
  if code:
    sys.exit(code)


def _input_errors() -> tuple:
  """The exception classes that are a problem of the user's input, each with a message that says what to do."""
  # Imported here, not at the top: these modules import jax, whose flags `_split_host_cpu` must set first.
  from data_pipelines import records  # pylint: disable=import-outside-toplevel
  from meme_jax import aot  # pylint: disable=import-outside-toplevel
  from meme_jax import convert  # pylint: disable=import-outside-toplevel
  return (records.DataNotFoundError, records.BadRecordError, convert.CheckpointMismatchError, aot.CompileTimeoutError)


def _exit_with_error(error: BaseException, code: int, *, traceback: bool) -> None:
  """Ends the run now: the full traceback in the log (for unexpected errors), the error's first line (what went
  wrong, with the file or record it concerns) as the last line of the output, its details just above.

  By the time an error reaches here the trainer has stopped its input workers and finished or abandoned its
  checkpoint writes. What may still run is a train-step compilation in a helper thread (the error came during
  initialisation), which an ordinary interpreter exit would wait minutes for; `os._exit` does not wait.
  """
  if traceback:
    logging.exception("the run failed")
  # What the interpreter's exit would do for multiprocessing (release the input pipeline's semaphores, so that
  # the resource tracker has nothing to warn about after the error line), without waiting for other threads.
  # Input workers still alive (an iterator the error left open) are stopped first, since it would wait for them.
  for child in multiprocessing.active_children():
    child.terminate()
  multiprocessing.util._exit_function()  # pylint: disable=protected-access
  logging.flush()
  sys.stdout.flush()
  message = f"{type(error).__name__}: {error}" if traceback else str(error)
  lines = message.strip().splitlines() or [type(error).__name__]
  if len(lines) > 1:
    print("\n".join(lines[1:]), file=sys.stderr)
  print(f"error: {lines[0]}", file=sys.stderr, flush=True)
  # Nothing of this process may print after the error line (a thread still compiling, say).
  devnull = os.open(os.devnull, os.O_WRONLY)
  os.dup2(devnull, 1)
  os.dup2(devnull, 2)
  os._exit(code)  # pylint: disable=protected-access


def summary_lines(summary, workdir: str):
  """The last lines of a training run: the headline metric against the baseline, every stat, steps and times."""
  metric = summary["metric"]
  line = f"{metric} {summary[metric]:.4f}"
  baseline_key = f"baseline_{metric}"
  if summary.get(baseline_key) is not None:
    base = summary[baseline_key]
    ratio = summary[metric] / base if base > 0 else float("inf")
    line += f"  (mean-pose baseline {metric} {base:.4f}; {ratio:.2f}x)"
  steps = f"{summary['step']} steps"
  if summary.get("steps_this_run", summary["step"]) != summary["step"]:
    steps += (f" ({summary['steps_this_run']} in this run, resumed at step "
              f"{summary['step'] - summary['steps_this_run']})")
  return [line, _format_stats(summary["stats"]),
          f"{steps} in {summary['wall_time_s']:.0f}s wall ({summary['compile_s']:.0f}s compile, "
          f"{summary['train_s']:.0f}s training, {summary['eval_s']:.0f}s evaluation); "
          f"summary: {os.path.join(workdir, 'summary.json')}"]


def _run_mode(config) -> int:
  """Runs --mode; returns the exit status (0, or 143 after a preemption)."""
  # Imported here, not at the top, for the same reason as in `_input_errors`; distributed initialisation must
  # come before anything touches a device.
  import jax  # pylint: disable=import-outside-toplevel
  from meme_jax import aot  # pylint: disable=import-outside-toplevel
  from meme_jax import evaluate  # pylint: disable=import-outside-toplevel
  from meme_jax import parallel  # pylint: disable=import-outside-toplevel
  from meme_jax import reporting  # pylint: disable=import-outside-toplevel
  from meme_jax import tasks  # pylint: disable=import-outside-toplevel
  from meme_jax import train  # pylint: disable=import-outside-toplevel
  parallel.initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id,
                                  [int(i) for i in FLAGS.local_device_ids])

  if FLAGS.mode == "parameters":
    task = tasks.get_task(config)
    model = task.build_model(config)
    variables = jax.eval_shape(lambda: model.init(
        {"params": jax.random.PRNGKey(0), "dropout": jax.random.PRNGKey(0)},
        jax.numpy.zeros((1,) + train.input_shape(config)), train=False))
    print(reporting.log_parameter_overview(dict(variables)))
    return 0

  if FLAGS.mode == "compile":
    aot.set_compile_effort(FLAGS.compile_effort or ("default" if FLAGS.topology == "local" else "fast"))
    report = aot.compile_report(config, FLAGS.topology, num_slices=FLAGS.num_slices,
                                batch_per_chip=FLAGS.batch_per_chip, infer_batch_per_chip=FLAGS.infer_batch_per_chip,
                                find_max_batch=FLAGS.find_max_batch, timeout_s=FLAGS.compile_timeout_s,
                                workdir=os.path.abspath(FLAGS.workdir) if FLAGS.workdir else None)
    for line in report["summary"]:
      _print(line)
    return 0

  workdir = os.path.abspath(FLAGS.workdir)
  if FLAGS.mode == "baseline":
    task = tasks.get_task(config)
    stats = task.baseline(workdir)
    if stats is None:
      raise app.UsageError(f"config.model.name={config.model.name!r} has no baseline")
    _print(f"mean-pose baseline: {_format_stats(stats)}")
    return 0

  if FLAGS.mode == "evaluate":
    result = evaluate.evaluate_run(config, workdir, FLAGS.checkpoint)
    where = f"step {result['step']}" if result["step"] is not None else config.init.checkpoint
    _print(f"{result['metric']} {result[result['metric']]:.4f} ({where}); {_format_stats(result['stats'])}")
    return 0

  summary = train.train_and_evaluate(config, workdir)
  if summary.get("preempted"):
    _print(f"stopped at step {summary['step']} of {summary['total_steps']} on a preemption request; run the same "
           f"command again to resume from the checkpoint in {workdir}")
    return 143
  for line in summary_lines(summary, workdir):
    _print(line)
  logging.info("summary: %s", json.dumps({k: v for k, v in summary.items() if not isinstance(v, dict)}))
  return 0


def run() -> None:
  app.run(main, argv=config_lib.resolve_config_argument(sys.argv))


if __name__ == "__main__":
  run()
