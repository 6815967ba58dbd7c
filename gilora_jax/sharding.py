"""Running the same code on 1 and N devices: a ``Mesh`` with axes ``data`` and ``model``, and where each array lives.

The pipeline and the layer math never call a collective themselves: they place their inputs with the shardings
below and let XLA's partitioner (GSPMD) run every jitted step on the shards and insert the collectives. So the
single-device program and the N-device program are the same Python code, and the N-device results are the same
numbers up to the order of the sums that cross devices.

Where things live on a mesh (``make_mesh``):

* **Calibration activations** (B, T, d) and token masks: the batch axis over ``data`` (``batch``). The block's
  forward runs data-parallel, and each site's Hessian ``XᵀX`` (a contraction over the sharded token axis) comes
  out of one all-reduce of the per-device partial sums that XLA inserts.
* **Block weights** during calibration (``param``): a 2-D kernel's output axis over ``model`` when it divides
  (attention heads and MLP columns split over ``model``: tensor-parallel, activations stay data-parallel),
  everything else (norms, biases, 1-D and indivisible weights) replicated.
* **Layer math** (``columns``): W's output columns over *every* device of the mesh (both axes). The GPTQ sweep is
  independent per output column given H's factor, which is replicated, so it needs no collective at all; grids,
  codes, R and Q stay column-sharded, L (d_in, r) and every H-sized quantity replicated. The low-rank steps use
  the forms of ``quant.lowrank.olrc`` (the input-side Gram ``Z Zᵀ`` reduced across column shards, then an eigh of
  a replicated d_in × d_in matrix; the output-side Gram ``Eᵀ H_λ E``, whose blocks need every pair of column
  shards, from an all-gather of the residual, then an eigh of a replicated d_out × d_out matrix). SRR's SVDs are
  not partitionable: XLA gathers their operand and computes them replicated (a fallback documented here; SRR
  costs one d_in × d_out gather per SVD).
* **Indivisible shapes fall back to replication**, never to a wrong result: a layer whose d_out the device count
  does not divide is quantized replicated (logged once per shape), a kernel whose output axis ``model`` does not
  divide is replicated. The calibration batch is the exception: its rows must divide over ``data``
  (``check_batches`` raises before any work, naming the batch and the fix).

A mesh built from ``jax.devices()`` after ``runtime.init_distributed`` spans every process of a multi-host run:
the same placements then split the work across hosts.
"""
from __future__ import annotations

import functools
import logging
import math
import re
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

log = logging.getLogger(__name__)

AXES = ("data", "model")

__all__ = ["AXES", "MeshError", "batch", "check_batches", "columns", "make_mesh", "param", "parse_mesh", "place",
           "place_module", "replicated"]


class MeshError(ValueError):
  """A mesh that cannot be built or does not fit the run (one line, with the fix)."""


def parse_mesh(spec: str) -> dict[str, int]:
  """``"data=2,model=4"`` -> ``{"data": 2, "model": 4}``; an axis left out has size 1, ``-1`` takes the devices
  left over (at most one axis).

  Example:
    >>> parse_mesh("data=2,model=4")
    {'data': 2, 'model': 4}
    >>> parse_mesh("model=2")
    {'data': 1, 'model': 2}
  """
  sizes: dict[str, int] = {}
  for part in filter(None, (p.strip() for p in spec.split(","))):
    m = re.fullmatch(r"(\w+)\s*=\s*(-?\d+)", part)
    if m is None:
      raise MeshError(f"--mesh {spec!r}: {part!r} is not AXIS=SIZE; write e.g. --mesh data=2,model=4 (axes: "
                      f"{', '.join(AXES)}), or --mesh auto.")
    axis, size = m.group(1), int(m.group(2))
    if axis not in AXES:
      raise MeshError(f"--mesh {spec!r}: unknown axis {axis!r}; the axes are {', '.join(AXES)}.")
    if axis in sizes:
      raise MeshError(f"--mesh {spec!r}: axis {axis!r} is given twice.")
    if size == 0 or size < -1:
      raise MeshError(f"--mesh {spec!r}: {axis}={size}; a size is a positive device count (or -1: the rest).")
    sizes[axis] = size
  if not sizes:
    raise MeshError(f"--mesh {spec!r} names no axis; write e.g. --mesh data=2,model=4, or --mesh auto.")
  if sum(v == -1 for v in sizes.values()) > 1:
    raise MeshError(f"--mesh {spec!r}: at most one axis can be -1 (the devices left over).")
  return {axis: sizes.get(axis, 1) for axis in AXES}


def make_mesh(spec: str | Mapping[str, int] | None = None, devices: Sequence[Any] | None = None) -> Mesh:
  """A ``(data, model)`` mesh over ``devices`` (default: every device of every process, ``jax.devices()``).

  ``spec``: ``None`` or ``"auto"`` (every device on ``data``: data-parallel calibration, and the layer math
  shards columns over all of them anyway), a string for ``parse_mesh``, or ``{"data": N, "model": M}``.
  Raises ``MeshError`` when the sizes do not multiply to the device count.
  """
  devices = list(jax.devices() if devices is None else devices)
  n = len(devices)
  if spec is None or spec == "auto":
    sizes = {"data": n, "model": 1}
  else:
    if isinstance(spec, str):
      sizes = parse_mesh(spec)
    else:
      if set(spec) - set(AXES):
        raise MeshError(f"mesh {dict(spec)}: unknown axes {sorted(set(spec) - set(AXES))}; the axes are "
                        f"{', '.join(AXES)}.")
      sizes = {a: int(spec.get(a, 1)) for a in AXES}
    rest = [a for a, v in sizes.items() if v == -1]
    if rest:
      known = math.prod(v for v in sizes.values() if v != -1)
      if n % known:
        raise MeshError(f"mesh {_fmt(sizes)}: {n} devices do not divide over the other axes' {known}.")
      sizes[rest[0]] = n // known
    if math.prod(sizes.values()) != n:
      raise MeshError(f"mesh {_fmt(sizes)} needs {math.prod(sizes.values())} devices; this run has {n} "
                      f"({devices[0].platform}, over {jax.process_count()} process(es)): pass sizes whose product "
                      f"is {n}, or --mesh auto.")
  # process-major order, so that a data shard's rows stay on one host in a multi-host run
  ordered = sorted(devices, key=lambda d: (d.process_index, d.id))
  return Mesh(np.array(ordered, dtype=object).reshape(sizes["data"], sizes["model"]), AXES)


def _fmt(sizes: Mapping[str, int]) -> str:
  return ",".join(f"{a}={v}" for a, v in sizes.items())


def replicated(mesh: Mesh) -> NamedSharding:
  """Every device holds the whole array."""
  return NamedSharding(mesh, P())


def batch(mesh: Mesh, shape: Sequence[int]) -> NamedSharding:
  """The leading (batch) axis over ``data``; raises ``MeshError`` when ``data`` does not divide it."""
  n = mesh.shape["data"]
  if shape and shape[0] % n:
    raise MeshError(f"a calibration batch of {shape[0]} rows does not divide over the mesh's data axis of {n} "
                    f"devices; pass a batch size (and sample count) that is a multiple of {n}, or a smaller data "
                    f"axis (--mesh data=1,model={mesh.size}).")
  return NamedSharding(mesh, P("data", *([None] * (len(shape) - 1))) if shape else P())


def param(mesh: Mesh, shape: Sequence[int]) -> NamedSharding:
  """A weight during calibration: a 2-D kernel's output axis over ``model`` when it divides, else replicated."""
  if len(shape) == 2 and mesh.shape["model"] > 1 and shape[1] % mesh.shape["model"] == 0:
    return NamedSharding(mesh, P(None, "model"))
  return replicated(mesh)


def columns(mesh: Mesh, shape: Sequence[int]) -> NamedSharding:
  """A (d_in, d_out) layer for the layer math: output columns over every device (``AXES``), or replicated when
  the device count does not divide d_out (logged once per shape)."""
  if len(shape) != 2 or mesh.size == 1:
    return replicated(mesh)
  if shape[-1] % mesh.size:
    _log_replicated(tuple(shape), mesh.size)
    return replicated(mesh)
  return NamedSharding(mesh, P(None, AXES))


@functools.lru_cache(maxsize=None)
def _log_replicated(shape: tuple[int, ...], n: int) -> None:
  log.info("a %s layer's %d output columns do not divide over %d devices: it is quantized replicated.",
           "×".join(map(str, shape)), shape[-1], n)


def place(x: Any, sharding: NamedSharding) -> jax.Array:
  """``x`` (NumPy or JAX) as a global array with ``sharding``; in a multi-host run each process supplies only
  the pieces its own devices hold, cut from its (identical) full copy."""
  if isinstance(x, jax.Array) and x.sharding == sharding:
    return x
  if jax.process_count() == 1:
    return jax.device_put(x, sharding)
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return jax.jit(lambda a: a, out_shardings=sharding)(x)
  host = np.asarray(x)
  return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])


def place_module(module: nnx.Module, mesh: Mesh) -> nnx.Module:
  """``module`` with every array placed by ``param`` (in place; returned for chaining)."""
  state = jax.tree.map(lambda a: place(a, param(mesh, np.shape(a))), nnx.state(module))
  nnx.update(module, state)
  return module


def check_batches(mesh: Mesh, calib: Sequence[Any]) -> None:
  """Every calibration batch divides over ``data`` (raises ``MeshError`` naming the first that does not)."""
  for k, b in enumerate(calib):
    rows = np.shape(b.inputs)[0]
    if rows % mesh.shape["data"]:
      raise MeshError(f"calibration batch {k} has {rows} rows, which do not divide over the mesh's data axis of "
                      f"{mesh.shape['data']} devices: pass --nsamples and --batch-size multiples of "
                      f"{mesh.shape['data']}, or --mesh data=1,model={mesh.size}.")


def is_writer() -> bool:
  """True in the process that writes files: process 0 of a multi-host run (the only process otherwise)."""
  return jax.process_index() == 0


def barrier(name: str) -> None:
  """Every process waits here for the others (a no-op in a single-process run)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    multihost_utils.sync_global_devices(f"gilora:{name}")


def gathered(module: nnx.Module) -> nnx.Module:
  """A copy of `module` whose arrays are whole on this host: shards that live on other processes are gathered
  (a collective: every process calls it, in the same order); local arrays are kept as they are."""
  def whole(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      if x.is_fully_replicated:
        return np.asarray(x.addressable_data(0))
      from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return x
  graphdef, state = nnx.split(module)
  return nnx.merge(graphdef, jax.tree.map(whole, state), copy=True)
