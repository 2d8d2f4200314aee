"""Loading experiment configs: `configs/NAME.py` or `configs/NAME.py:ARG`, exactly as `--config` takes them."""
import importlib.util
import os
import sys

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


def load_config(spec: str) -> ml_collections.ConfigDict:
  """Loads `path/to/config.py` or `path/to/config.py:ARG` and returns `get_config(ARG)`."""
  path, sep, arg = spec.partition(":")
  path = resolve_config_path(path)
  # Config files may import one another as `configs.NAME`.
  if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)
  name = "_meme_jax_config_" + os.path.splitext(os.path.basename(path))[0]
  module_spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise AttributeError(f"config file {path!r} defines no get_config()")
  config = module.get_config(arg) if sep else module.get_config()
  return config
