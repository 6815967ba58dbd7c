"""Reading a HF `config.json`, shared by the model ports and the converter (errors name the file and the fix)."""
from __future__ import annotations

import json
import os
from typing import Any

DTYPES = ("float32", "bfloat16", "float16")


def read_config(path_or_dict: str | os.PathLike | dict[str, Any]) -> tuple[dict[str, Any], str]:
  """(parsed config, where it came from for error messages) from a model folder, a config.json path or a dict."""
  if isinstance(path_or_dict, dict):
    return path_or_dict, "the given config dict"
  path = os.fspath(path_or_dict)
  path = os.path.join(path, "config.json") if os.path.isdir(path) else path
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f), path
  except FileNotFoundError as e:
    raise FileNotFoundError(f"{path} is missing: a HF model folder needs config.json beside its weights.") from e
  except json.JSONDecodeError as e:
    raise ValueError(f"{path} is not valid JSON ({e}); restore it from the original checkpoint.") from e


def check_dtypes(cfg) -> None:
  """Raises unless `cfg.dtype` and `cfg.param_dtype` name a supported float dtype."""
  for name in ("dtype", "param_dtype"):
    if getattr(cfg, name) not in DTYPES:
      raise ValueError(f"{name} must be one of {DTYPES}, got {getattr(cfg, name)!r}")
