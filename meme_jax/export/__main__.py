"""python -m meme_jax.export: a checkpoint of either family as an ONNX model or a StableHLO module.

  python -m meme_jax.export --config configs/eeffpose_p0.py --checkpoint CKPT --format onnx --output p0.onnx \\
      [--batch N|dynamic] [--precision float32|float16|bfloat16] [--verify]

CKPT is what `meme_jax.predict` takes: an orbax directory (`meme_jax.convert`, a training checkpoint step) or an
original PyTorch `.pth` / `.pth.xz`. With `--verify` (default) the export is run once (onnxruntime, or JAX for
StableHLO) beside the JAX model on a random input and the largest difference is printed; a float32 export that
differs by more than 1e-3 of the output range fails.
"""
import sys
import time

from absl import app
from absl import flags
import jax
import numpy as np
from ml_collections import config_flags

from meme_jax import config as config_lib
from meme_jax import models
from meme_jax.export import model as export_lib
from meme_jax.export import stablehlo
from meme_jax.predict import load_checkpoint

TOLERANCE = 1e-3


def define_flags():
  config_flags.DEFINE_config_file("config", None, "experiment config, configs/NAME.py[:ARG]", lock_config=False)
  flags.DEFINE_string("checkpoint", None, "orbax directory or an original .pth / .pth.xz")
  flags.DEFINE_enum("format", "onnx", export_lib.FORMATS, "what to write")
  flags.DEFINE_string("output", None, "the file to write")
  flags.DEFINE_string("batch", "dynamic", "the batch size the export takes: N, or 'dynamic'")
  flags.DEFINE_enum("precision", "float32", ("float32", "float16", "bfloat16"),
                    "compute precision (inputs and outputs stay float32)")
  flags.DEFINE_bool("verify", True, "run the export beside the JAX model once and print the difference")
  flags.mark_flags_as_required(["config", "checkpoint", "output"])


def parse_batch(text: str):
  if text == "dynamic":
    return None
  try:
    batch = int(text)
  except ValueError:
    batch = 0
  if batch < 1:
    raise app.UsageError(f"--batch={text!r}: expected a positive integer or 'dynamic'")
  return batch


def run_export(data: bytes, fmt: str, images: np.ndarray):
  if fmt == "stablehlo":
    exported = stablehlo.deserialize(data)
    out = exported.call(images)
    return [np.asarray(out[k]) for k in sorted(out)], sorted(out)
  # onnxruntime is the [export] extra's.
  import onnxruntime  # pylint: disable=import-outside-toplevel
  session = onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])
  names = [o.name for o in session.get_outputs()]
  return session.run(None, {"images": images}), names


def verify(config, variables, data: bytes, fmt: str, batch, precision: str) -> float:
  """max |export - JAX| over the outputs on a random normalised batch; raises for a float32 export off by more
  than TOLERANCE of the output range."""
  width, height = (int(v) for v in config.data.image_size)
  images = np.random.default_rng(0).standard_normal((batch or 2, 3, height, width)).astype(np.float32)
  expected = jax.jit(export_lib.nchw_forward(config, variables))(images)
  got, names = run_export(data, fmt, images)
  order = list(models.output_names(config))
  worst = 0.0
  for name, value in zip(names, got):
    reference = np.asarray(expected[order.index(name)])
    diff = float(np.abs(value - reference).max())
    scale = max(1.0, float(np.abs(reference).max()))
    print(f"  {name} {tuple(value.shape)}: max |{fmt} - jax| = {diff:.2e}")
    if precision == "float32" and diff > TOLERANCE * scale:
      raise RuntimeError(f"the {fmt} export of {name} differs from the JAX model by {diff:.3g} "
                         f"(more than {TOLERANCE:g} x {scale:.3g})")
    worst = max(worst, diff)
  return worst


def main(argv):
  del argv
  fl = flags.FLAGS
  batch = parse_batch(fl.batch)
  config = fl.config
  variables = load_checkpoint(fl.checkpoint, config)
  start = time.perf_counter()
  data = export_lib.export_model(config, variables, fl.format, batch=batch, precision=fl.precision)
  with open(fl.output, "wb") as f:
    f.write(data)
  print(f"{fl.format} ({fl.precision}, batch {fl.batch}) -> {fl.output}: {len(data) / 2**20:.1f} MiB in "
        f"{time.perf_counter() - start:.1f} s")
  if fl.verify:
    verify(config, variables, data, fl.format, batch, fl.precision)


if __name__ == "__main__":
  define_flags()
  app.run(main, argv=config_lib.resolve_config_argument(sys.argv))
