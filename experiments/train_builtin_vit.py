"""Train the built-in DeiT on scikit-learn's 1,797 8x8 digits -> gilora_jax/assets/deit-digits/.

The digits are read straight out of the scikit-learn wheel (`sklearn/datasets/data/digits.csv.gz`), so
scikit-learn is never imported or installed. On a 2-core CPU (a few minutes):

  pip download --no-deps --only-binary :all: -d /tmp/dl scikit-learn==1.9.1
  python experiments/train_builtin_vit.py \
      --wheel /tmp/dl/scikit_learn-1.9.1-cp311-cp311-manylinux_2_27_x86_64.manylinux_2_28_x86_64.whl \
      --workdir runs/builtin_vit

Images: 0..16 counts -> uint8 0..255 (round(v * 255 / 16)), grey -> 3 equal channels, 8x8 -> 32x32 by nearest
(each pixel becomes a 4x4 block), /255, then (x - 0.5) / 0.5. Split: stratified, `test_frac` of each class
held out with a fixed seed. The model is our NNX port `gilora_jax.models.deit.DeiT` in the
`DeiTForImageClassification` layout (cls + distillation token, logits from the cls token), written with
`gilora_jax.models.convert.save_hf`, re-loaded with `gilora_jax.load_model` and compared with transformers.
"""
import dataclasses
import gzip
import io
import os
import pathlib
import sys
import time
import zipfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo, for gilora_jax
import _builtin  # noqa: E402  pylint: disable=wrong-import-position

DIGITS = "sklearn/datasets/data/digits.csv.gz"
REPO = pathlib.Path(__file__).resolve().parents[1]


@dataclasses.dataclass(frozen=True)
class Args:
  """Train the built-in DeiT on sklearn digits and write it as an HF folder.

  pip download --no-deps --only-binary :all: -d /tmp/dl scikit-learn==1.9.1
  python experiments/train_builtin_vit.py \
      --wheel /tmp/dl/scikit_learn-1.9.1-cp311-cp311-manylinux_2_27_x86_64.manylinux_2_28_x86_64.whl
  """
  wheel: pathlib.Path = pathlib.Path(
      "/tmp/dl/scikit_learn-1.9.1-cp311-cp311-manylinux_2_27_x86_64.manylinux_2_28_x86_64.whl")
  workdir: pathlib.Path = pathlib.Path("runs/builtin_vit")
  out: pathlib.Path = REPO / "gilora_jax/assets/deit-digits"
  test_frac: float = 0.2
  calib_images: int = 128                 # shipped from the *train* split, for quantization calibration
  # model
  image_size: int = 32
  patch_size: int = 8
  hidden_size: int = 96
  intermediate_size: int = 384
  num_hidden_layers: int = 4
  num_attention_heads: int = 3
  layer_norm_eps: float = 1e-6
  # optimisation
  batch_size: int = 64
  steps: int = 2000
  lr: float = 2e-3
  warmup_steps: int = 100
  weight_decay: float = 0.05
  clip_norm: float = 1.0
  max_shift: int = 0                      # random translation (8x8 pixels); 1 underfits in this budget
  seed: int = 0
  log_every: int = 50
  eval_every: int = 500
  save_dtype: str = "float32"             # "bfloat16" or "float32"
  verify_torch: bool = True               # compare logits with transformers.DeiTForImageClassification


# ------------------------------------------------------------------------------------------------ data


def read_digits(wheel: pathlib.Path) -> tuple[np.ndarray, np.ndarray]:
  """(images uint8 (1797, 8, 8) in 0..255, labels int32 (1797,)) from the csv inside the wheel."""
  with zipfile.ZipFile(wheel) as zf:
    raw = gzip.decompress(zf.read(DIGITS))
  data = np.loadtxt(io.BytesIO(raw), delimiter=",", dtype=np.int64)
  if data.shape != (1797, 65) or data[:, :64].max() != 16:
    raise ValueError(f"unexpected digits table {data.shape}")
  images = np.round(data[:, :64].reshape(-1, 8, 8) * 255 / 16).astype(np.uint8)
  return images, data[:, 64].astype(np.int32)


def split(labels: np.ndarray, test_frac: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """Stratified (train_idx, test_idx), both sorted."""
  rng = np.random.default_rng(seed)
  test = []
  for c in np.unique(labels):
    idx = rng.permutation(np.flatnonzero(labels == c))
    test.append(idx[: round(len(idx) * test_frac)])
  test = np.sort(np.concatenate(test))
  return np.setdiff1d(np.arange(len(labels)), test), test


def pixel_values(images: np.ndarray, image_size: int) -> np.ndarray:
  """uint8 (B, 8, 8) -> float32 (B, 3, S, S): nearest upscale, /255, normalise with mean = std = 0.5."""
  r = image_size // images.shape[-1]
  x = np.repeat(np.repeat(images.astype(np.float32) * np.float32(1 / 255), r, axis=-2), r, axis=-1)
  return np.repeat(((x - 0.5) / 0.5)[:, None], 3, axis=1)


def random_shift(images: np.ndarray, max_shift: int, rng) -> np.ndarray:
  """Translate each 8x8 image by up to max_shift pixels (zero fill)."""
  out = np.zeros_like(images)
  n, h, w = images.shape
  pad = np.pad(images, ((0, 0), (max_shift, max_shift), (max_shift, max_shift)))
  dy, dx = rng.integers(0, 2 * max_shift + 1, (2, n))
  for i in range(n):
    out[i] = pad[i, dy[i]:dy[i] + h, dx[i]:dx[i] + w]
  return out


# ----------------------------------------------------------------------------------------------- model
# The model is gilora_jax.models.deit.DeiT (the NNX port); training runs on its (graphdef, state) split.


def model_config(a: Args):
  from gilora_jax.models import deit  # pylint: disable=import-outside-toplevel
  return deit.ModelConfig(
      architecture="DeiTForImageClassification", hidden_size=a.hidden_size, num_hidden_layers=a.num_hidden_layers,
      num_attention_heads=a.num_attention_heads, intermediate_size=a.intermediate_size, image_size=a.image_size,
      patch_size=a.patch_size, num_channels=3, num_labels=10, layer_norm_eps=a.layer_norm_eps)


def init_model(cfg, seed: int):
  """DeiT with timm-style init: truncated N(0, 0.02) weights and tokens, zero biases, unit LayerNorm gains."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from gilora_jax.models import deit  # pylint: disable=import-outside-toplevel
  graphdef, state = nnx.split(deit.DeiT(cfg, rngs=nnx.Rngs(seed)))
  leaves, treedef = jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(state))
  new = []
  for (path, leaf), key in zip(leaves, jax.random.split(jax.random.key(seed), len(leaves))):
    name = ".".join(str(getattr(k, "key", k)) for k in path)
    if name.endswith("bias"):
      new.append(jnp.zeros_like(leaf))
    elif name.endswith("scale"):
      new.append(jnp.ones_like(leaf))
    else:
      new.append(0.02 * jax.random.truncated_normal(key, -2.0, 2.0, leaf.shape, leaf.dtype))
  nnx.replace_by_pure_dict(state, jax.tree_util.tree_unflatten(treedef, new))
  return graphdef, state


def preprocessor_config(a: Args) -> dict:
  """DeiTImageProcessor settings equivalent to `pixel_values` (for 8x8 uint8 greyscale images as RGB)."""
  return {"image_processor_type": "DeiTImageProcessor", "do_resize": True,
          "size": {"height": a.image_size, "width": a.image_size}, "resample": 0, "do_center_crop": False,
          "crop_size": {"height": a.image_size, "width": a.image_size}, "do_rescale": True,
          "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": [0.5, 0.5, 0.5],
          "image_std": [0.5, 0.5, 0.5]}


# -------------------------------------------------------------------------------------------- training


def top1(model, images, labels, a: Args, batch: int = 256) -> float:
  import jax  # pylint: disable=import-outside-toplevel
  fwd = jax.jit(lambda m, x: m(x))
  pred = np.concatenate([np.asarray(fwd(model, pixel_values(images[s:s + batch], a.image_size))).argmax(-1)
                         for s in range(0, len(images), batch)])
  return float((pred == labels).mean())


def train(a: Args, cfg, images, labels, test_images, test_labels, writer):
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import optax  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel

  graphdef, state = init_model(cfg, a.seed)
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state))
  schedule = optax.warmup_cosine_decay_schedule(0.0, a.lr, a.warmup_steps, a.steps, 0.0)
  decay_mask = jax.tree.map(lambda x: x.ndim == 2 or x.ndim == 4, state)    # matrices and the patch conv only
  tx = optax.chain(optax.clip_by_global_norm(a.clip_norm),
                   optax.adamw(schedule, weight_decay=a.weight_decay, mask=decay_mask))
  opt_state = tx.init(state)

  def loss_fn(state, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(nnx.merge(graphdef, state)(x), y).mean()

  @jax.jit
  def step(state, opt_state, x, y):
    loss, grads = jax.value_and_grad(loss_fn)(state, x, y)
    updates, opt_state = tx.update(grads, opt_state, state)
    return optax.apply_updates(state, updates), opt_state, loss

  rng = np.random.default_rng(a.seed)
  writer.write(event="start", n_params=n_params, train_images=int(len(labels)), test_images=int(len(test_labels)))
  t0, c0, losses = time.time(), time.process_time(), []
  for i in range(1, a.steps + 1):
    idx = rng.integers(0, len(labels), a.batch_size)
    x = pixel_values(random_shift(images[idx], a.max_shift, rng), a.image_size)
    state, opt_state, loss = step(state, opt_state, jnp.asarray(x), jnp.asarray(labels[idx]))
    losses.append(loss)
    if i % a.log_every == 0 or i == a.steps:
      mean_loss = float(np.mean(jax.device_get(losses)))
      losses = []
      writer.write(step=i, train_loss=round(mean_loss, 4), lr=float(schedule(i)),
                   cpu_s=round(time.process_time() - c0, 1))
    if i % a.eval_every == 0 or i == a.steps:
      writer.write(step=i, test_top1=top1(nnx.merge(graphdef, state), test_images, test_labels, a))
  return graphdef, state, n_params, time.time() - t0, time.process_time() - c0, mean_loss


def torch_max_diff(folder: pathlib.Path, model, x: np.ndarray) -> float:
  """max |logit(our port) - logit(transformers.DeiTForImageClassification)|, both float32 from the same folder."""
  import torch  # pylint: disable=import-outside-toplevel
  from transformers import DeiTForImageClassification  # pylint: disable=import-outside-toplevel
  ref_model = DeiTForImageClassification.from_pretrained(folder, dtype=torch.float32).eval()
  with torch.no_grad():
    ref = ref_model(pixel_values=torch.as_tensor(x)).logits.numpy()
  return float(np.abs(np.asarray(model(x)) - ref).max())


def main(a: Args) -> dict:
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from gilora_jax.models import deit  # pylint: disable=import-outside-toplevel
  from gilora_jax import load_model  # pylint: disable=import-outside-toplevel
  writer = _builtin.JsonlWriter(a.workdir)
  _builtin.write_json(a.workdir / "args.json", _builtin.args_dict(a))
  t_start = time.time()

  images, labels = read_digits(a.wheel)
  train_idx, test_idx = split(labels, a.test_frac, a.seed)
  calib_idx = np.sort(np.random.default_rng(a.seed + 1).choice(train_idx, a.calib_images, replace=False))
  # The fast NumPy preprocessing used for training must equal the library's HF-recipe `deit.preprocess`.
  rgb = np.repeat(images[test_idx][..., None], 3, axis=-1)
  if not np.allclose(deit.preprocess(rgb, preprocessor_config(a)), pixel_values(images[test_idx], a.image_size),
                     rtol=0, atol=1e-6):
    raise AssertionError("pixel_values() and deit.preprocess(preprocessor_config) disagree")
  writer.write(event="data", train=int(len(train_idx)), test=int(len(test_idx)), calib=int(len(calib_idx)),
               test_per_class=np.bincount(labels[test_idx]).tolist())

  cfg = model_config(a)
  graphdef, state, n_params, train_s, train_cpu_s, final_loss = train(
      a, cfg, images[train_idx], labels[train_idx], images[test_idx], labels[test_idx], writer)
  acc_f32 = top1(nnx.merge(graphdef, state), images[test_idx], labels[test_idx], a)
  labels = {"id2label": {str(i): str(i) for i in range(10)}, "label2id": {str(i): i for i in range(10)}}
  _builtin.export(graphdef, state, a.out, a.save_dtype, "deit", extra_config=labels)
  _builtin.write_json(a.out / "preprocessor_config.json", preprocessor_config(a))
  np.savez_compressed(a.out / "digits_test.npz", images=images[test_idx], labels=labels[test_idx],
                      index=test_idx.astype(np.int32), calib_images=images[calib_idx],
                      calib_labels=labels[calib_idx], calib_index=calib_idx.astype(np.int32))
  shipped = load_model(a.out)
  result = dict(n_params=n_params, train_seconds=round(train_s, 1), train_cpu_seconds=round(train_cpu_s, 1),
                total_seconds=round(time.time() - t_start, 1), final_train_loss=round(final_loss, 4),
                test_top1_f32=acc_f32, test_top1_shipped=top1(shipped, images[test_idx], labels[test_idx], a),
                train_top1_shipped=top1(shipped, images[train_idx], labels[train_idx], a),
                test_images=int(len(test_idx)), save_dtype=a.save_dtype)
  if a.verify_torch:
    result["torch_max_abs_logit_diff"] = torch_max_diff(a.out, shipped, pixel_values(images[test_idx[:32]],
                                                                                     a.image_size))
  writer.write(event="done", **result)
  _builtin.write_json(a.workdir / "result.json", result)
  writer.close()
  return result


if __name__ == "__main__":
  main(_builtin.parse_args(Args))
