"""Export for deployment: ONNX (onnxruntime, TensorRT, OpenVINO) and StableHLO (`jax.export`).

  python -m meme_jax.export --config CONFIG --checkpoint CKPT --format onnx|stablehlo --output FILE \\
      [--batch N|dynamic] [--precision float32|float16|bfloat16]

`export_model(config, variables, fmt, batch=None, precision='float32')` returns the serialised model.
"""
from meme_jax.export.model import export_model, folded_graph, nchw_forward

__all__ = ["export_model", "folded_graph", "nchw_forward"]
