"""Shared test fixtures: paths to the reference checkpoints and the real sample data in ../shared."""
import os

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.environ.get("MEME_JAX_SHARED", os.path.join(os.path.dirname(REPO_ROOT), "shared"))
REFERENCE = os.path.join(SHARED, "reference")
SAMPLES = os.path.join(SHARED, "data", "samples")
SPEC = os.path.join(SHARED, "spec")


def shared_path(*parts) -> str:
  """A path under ../shared; the test fails (not skips) when it is absent, since CI always has it."""
  path = os.path.join(SHARED, *parts)
  if not os.path.exists(path):
    pytest.fail(f"{path} is missing: tests expect the shared/ folder beside the checkout "
                f"(or MEME_JAX_SHARED pointing at it)")
  return path
