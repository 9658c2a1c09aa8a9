"""Run the kernels per device under a mesh: ``jax.shard_map`` over the batch (and head) axes.

A ``pallas_call`` is an opaque custom call to XLA's partitioner, which would gather every operand
onto every device. Each kernel only couples tokens of one (row, head), so under a mesh the
kernels run inside ``jax.shard_map`` with rows split over the batch axes and heads over the head
axes; nothing crosses devices.

Which axes:
- **Explicit** mesh axes (the default of ``jax.make_mesh``): read from the operands' types
  (``jax.typeof(q).sharding``): dim 0 of ``q`` gives the batch axes, dim 2 the head axes. A
  sharded time axis is refused (the kernels need whole sequences).
- **Auto** axes: types carry no sharding, so the rows go over every mesh axis whose size divides
  the batch (in mesh order, as ``osdn_jax.train`` shards its batches), heads over none. A
  ``context`` axis is never a row axis: it splits time (``osdn_jax.ops.context`` runs the kernels
  per slice there). Override
  with ``with kernel_partition(batch=("data",), heads=("model",)):``.
- No mesh in context (``jax.set_mesh``), or a one-device mesh: the kernels run as they are.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses

import jax
import numpy as np
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P


@dataclasses.dataclass(frozen=True)
class Axes:
    """Mesh axis names for rows (``batch``) and heads (``heads``); empty tuples: not split."""

    batch: tuple[str, ...] = ()
    heads: tuple[str, ...] = ()

    def spec(self, layout: str) -> P:
        """The PartitionSpec for a layout string: ``b`` batch, ``h`` heads, anything else whole."""
        names = {"b": self.batch or None, "h": self.heads or None}
        return P(*(names.get(c) for c in layout))


_OVERRIDE: contextvars.ContextVar[Axes | None] = contextvars.ContextVar("osdn_kernel_partition", default=None)


@contextlib.contextmanager
def kernel_partition(batch=(), heads=()):
    """Split the kernels' rows over the mesh axes ``batch`` and heads over ``heads`` (Auto meshes)."""
    token = _OVERRIDE.set(Axes(_names(batch), _names(heads)))
    try:
        yield
    finally:
        _OVERRIDE.reset(token)


def _names(entry) -> tuple[str, ...]:
    if entry is None:
        return ()
    return (entry,) if isinstance(entry, str) else tuple(entry)


def _mesh_of(x):
    typed = getattr(jax.typeof(x), "sharding", None)
    mesh = getattr(typed, "mesh", None)
    if mesh is not None and not mesh.empty:
        return mesh, typed.spec
    return jax.sharding.get_abstract_mesh(), None


def axes_for(q, *, B: int, H: int) -> tuple[object, Axes] | None:
    """``(mesh, Axes)`` to run the kernels under for operands like ``q [B, T, H, K]``, or None."""
    mesh, spec = _mesh_of(q)
    if mesh is None or mesh.empty or mesh.size == 1:
        return None
    explicit = [n for n, t in zip(mesh.axis_names, mesh.axis_types) if t == AxisType.Explicit]
    if spec is not None and explicit:
        spec = tuple(spec) + (None,) * (4 - len(spec))
        if _names(spec[1]):
            raise ValueError(f"q: the time axis is sharded over mesh axes {_names(spec[1])}; the Pallas kernels "
                             "need whole sequences per device (shard the batch or heads, or use impl='chunked')")
        axes = Axes(_names(spec[0]), _names(spec[2]))
    else:
        axes = _OVERRIDE.get()
        if axes is None:
            batch, size = [], 1
            for name in mesh.axis_names:
                n = mesh.shape[name]
                if name != "context" and n > 1 and B % (size * n) == 0:
                    batch.append(name)
                    size *= n
            axes = Axes(tuple(batch))
    for what, names, dim in (("batch", axes.batch, B), ("heads", axes.heads, H)):
        size = int(np.prod([mesh.shape[n] for n in names])) if names else 1
        if dim % size:
            raise ValueError(f"kernel_partition: {what} axes {names} split {dim} over {size} devices; "
                             f"expected a divisor of {dim}")
    if not axes.batch and not axes.heads:
        return None
    return mesh, axes


def run_partitioned(fn, args: dict, layouts: dict, out_layouts, *, q, B: int, H: int):
    """``fn(**args)``, per device under the mesh in force when there is one.

    ``layouts`` gives each array argument's layout string (``"bthk"``: batch, time, heads, feature;
    ``"bh"``..., ``None`` args pass through); ``out_layouts`` mirrors ``fn``'s output tree.
    """
    found = axes_for(q, B=B, H=H)
    if found is None:
        return fn(**args)
    mesh, axes = found
    names = [n for n, a in args.items() if a is not None]
    in_specs = tuple(axes.spec(layouts[n]) for n in names)
    out_specs = jax.tree.map(axes.spec, out_layouts)

    def local(*xs):
        return fn(**{**args, **dict(zip(names, xs))})

    xs = tuple(_placed(args[n], spec, mesh) for n, spec in zip(names, in_specs))
    return jax.shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)(*xs)


def _placed(x, spec: P, mesh):
    """``x`` resharded to ``spec`` where its type says otherwise on Explicit mesh axes. ``shard_map``
    reshards Auto axes by itself but refuses an Explicit-typed operand whose spec differs, as with
    an operand derived from an input the caller left unsharded (``jax.jit(..., in_shardings=...)``
    called with unplaced arrays)."""
    if not any(t == AxisType.Explicit for t in mesh.axis_types):
        return x
    typed = getattr(jax.typeof(x), "sharding", None)
    have = tuple(typed.spec) if typed is not None else ()
    want = tuple(spec)
    pad = lambda s: s + (None,) * (x.ndim - len(s))  # noqa: E731
    if pad(have) == pad(want):
        return x
    return jax.sharding.reshard(x, spec)
