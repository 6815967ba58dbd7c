"""The GPTQ reload, run by another interpreter: `python _gptq_child.py DIR IN.npz OUT.npz`.

transformers reads GPTQ folders through optimum + gptqmodel, whose releases need a newer torch than this project's
environment pins, so `check.gptq_reload` runs this file with the interpreter of a separate environment that has
them (`--gptq-python`). It imports nothing of gilora_jax: only torch, transformers (and peft for the adapter).
Reads token ids `x` from IN.npz, loads DIR with `AutoModelForCausalLM` on CPU in float32 (gptqmodel picks its own
CPU kernel), and writes the logits of the base (`base`) and, when DIR/adapter exists and peft is importable, with
the adapter applied (`adapter`) to OUT.npz, with the versions and kernel used. A missing package is exit code 3
and one line on stderr naming it.
"""
import json
import os
import sys


def main(folder: str, inputs: str, out: str) -> int:
  missing = [m for m in ("torch", "transformers", "optimum", "gptqmodel") if not _importable(m)]
  if missing:
    print(f"missing: {', '.join(missing)}", file=sys.stderr)
    return 3
  import numpy as np  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  x = torch.from_numpy(np.load(inputs)["x"]).long()
  model = transformers.AutoModelForCausalLM.from_pretrained(folder, device_map="cpu", dtype=torch.float32).eval()
  kernels = sorted({type(m).__name__ for m in model.modules() if "QuantLinear" in type(m).__name__
                    or type(m).__module__.startswith("gptqmodel.nn_modules.qlinear")})
  result = {}
  with torch.no_grad():
    result["base"] = model(input_ids=x).logits.float().numpy()
    adapter = os.path.join(folder, "adapter")
    if os.path.isdir(adapter) and _importable("peft"):
      import peft  # pylint: disable=import-outside-toplevel
      result["adapter"] = peft.PeftModel.from_pretrained(model, adapter).eval()(input_ids=x).logits.float().numpy()
  import gptqmodel  # pylint: disable=import-outside-toplevel
  info = {"torch": torch.__version__, "transformers": transformers.__version__,
          "gptqmodel": getattr(gptqmodel, "__version__", "?"), "kernels": kernels,
          "adapter": "adapter" in result, "peft": _importable("peft")}
  np.savez(out, info=np.asarray(json.dumps(info)), **result)
  return 0


def _importable(name: str) -> bool:
  import importlib.util  # pylint: disable=import-outside-toplevel
  return importlib.util.find_spec(name) is not None


if __name__ == "__main__":
  sys.exit(main(*sys.argv[1:4]))
