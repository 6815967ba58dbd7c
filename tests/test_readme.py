"""README's Python example runs as written (it composes gptq, olrc and refine, then checks quantize_layer gives the
same codes)."""
import os
import re

import pytest

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


@pytest.mark.slow
def test_the_python_example_runs(capsys):
  with open(README, encoding="utf-8") as f:
    blocks = re.findall(r"```python\n(.*?)```", f.read(), flags=re.S)
  assert len(blocks) == 1
  exec(compile(blocks[0], "README.md", "exec"), {})  # pylint: disable=exec-used
  out = capsys.readouterr().out.split("\n")
  gptq_err, olrc_err = float(out[0]), float(out[1])
  objective = [float(v) for v in out[2].strip("[]").split()]
  assert olrc_err < gptq_err and objective[0] == pytest.approx(olrc_err, rel=1e-4)  # the composition's steps
  assert len(objective) == 5 and all(b <= a * (1 + 1e-6) for a, b in zip(objective, objective[1:]))
  free = [float(v) for v in out[3].strip("()").split(",")]  # the one call's default report: OLrC's optima
  assert len(free) == 4 and free[1:] == pytest.approx(objective[::2], rel=1e-4)
  rel_err, bound = map(float, out[4].split())
  assert 0 < rel_err < bound
