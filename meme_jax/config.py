"""Loading experiment configs: `configs/NAME.py` or `configs/NAME.py:ARG`, exactly as `--config` takes them.

Config files import one another as `configs.NAME`: the `configs` package is installed with meme_jax.
"""
import importlib.util
import os
from typing import List, Sequence

import ml_collections

# The repository root: configs/ lives beside the meme_jax package.
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def resolve_config_path(path: str) -> str:
  """Finds a config file relative to the working directory, else relative to the repository root."""
  if os.path.isfile(path):
    return os.path.abspath(path)
  candidate = os.path.join(REPO_ROOT, path)
  if os.path.isfile(candidate):
    return candidate
  raise FileNotFoundError(
      f"config file {path!r} not found (looked in {os.getcwd()!r} and {REPO_ROOT!r})")


def resolve_config_argument(argv: Sequence[str], flag: str = "config") -> List[str]:
  """`argv` with the file of `--FLAG configs/NAME.py[:ARG]` (or `--FLAG=...`) found as `resolve_config_path` finds it.

  ml_collections' config flags read the file relative to the working directory only; this lets a command given
  `--config configs/NAME.py` run from any directory. A path found in the working directory, or nowhere (for the
  flag to report), is left as it is.
  """
  out = list(argv)
  for i, arg in enumerate(out):
    if arg.startswith(f"--{flag}="):
      index, prefix, value = i, f"--{flag}=", arg[len(f"--{flag}="):]
    elif arg == f"--{flag}" and i + 1 < len(out):
      index, prefix, value = i + 1, "", out[i + 1]
    else:
      continue
    path, sep, rest = value.partition(":")
    candidate = os.path.join(REPO_ROOT, path)
    if not os.path.isfile(path) and os.path.isfile(candidate):
      out[index] = prefix + candidate + sep + rest
  return out


def load_config(spec: str) -> ml_collections.ConfigDict:
  """Loads `path/to/config.py` or `path/to/config.py:ARG` and returns `get_config(ARG)`."""
  path, sep, arg = spec.partition(":")
  path = resolve_config_path(path)
  name = "_meme_jax_config_" + os.path.splitext(os.path.basename(path))[0]
  module_spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise AttributeError(f"config file {path!r} defines no get_config()")
  config = module.get_config(arg) if sep else module.get_config()
  return config
