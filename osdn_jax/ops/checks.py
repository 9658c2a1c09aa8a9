"""Argument checks for the ops front door: every failure is a ``ValueError`` that names the
argument, the expected shape or dtype, and what was given."""

from __future__ import annotations

import math
from typing import Any

import jax.numpy as jnp
import numpy as np

FLOAT_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32))
_FLOAT_NAMES = "bfloat16, float16 or float32"


def _shape_str(shape) -> str:
    return "[" + ", ".join(str(s) for s in shape) + "]"


def _describe(x: Any) -> str:
    shape = getattr(x, "shape", None)
    dtype = getattr(x, "dtype", None)
    if shape is None or dtype is None:
        return f"a {type(x).__name__}"
    return f"shape {_shape_str(shape)} dtype {jnp.dtype(dtype).name}"


def fail(name: str, expected: str, x: Any) -> None:
    raise ValueError(f"{name}: expected {expected}, got {_describe(x)}")


def check_float(name: str, x: Any, shape: tuple, layout: str) -> None:
    """``x`` is an array of exactly ``shape`` (described as ``layout``) with a float dtype."""
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        fail(name, f"an array {layout}", x)
    if tuple(x.shape) != tuple(shape):
        fail(name, f"shape {layout} = {_shape_str(shape)}", x)
    if jnp.dtype(x.dtype) not in FLOAT_DTYPES:
        fail(name, f"a {_FLOAT_NAMES} array {layout}", x)


def check_qkv(q: Any, k: Any, v: Any) -> tuple[int, int, int, int, int]:
    """Checks ``q, k [B, T, H, K]`` and ``v [B, T, H, V]`` (one float dtype); returns B, T, H, K, V."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not hasattr(x, "ndim") or x.ndim != 4:
            fail(name, "a rank-4 array [B, T, H, K]" if name != "v" else "a rank-4 array [B, T, H, V]", x)
    B, T, H, K = k.shape
    check_float("k", k, (B, T, H, K), "[B, T, H, K]")
    check_float("q", q, (B, T, H, K), "[B, T, H, K] like k")
    V = v.shape[-1]
    check_float("v", v, (B, T, H, V), f"[B, T, H, V] with B, T, H = {B}, {T}, {H} like k")
    if not (jnp.dtype(q.dtype) == jnp.dtype(k.dtype) == jnp.dtype(v.dtype)):
        raise ValueError(
            f"q, k, v: expected one dtype, got q {jnp.dtype(q.dtype).name}, k {jnp.dtype(k.dtype).name}, "
            f"v {jnp.dtype(v.dtype).name}"
        )
    if T < 1 or K < 1 or V < 1:
        fail("k", "T, K, V >= 1", k)
    return B, T, H, K, V


def check_optional(name: str, x: Any, shape: tuple, layout: str) -> None:
    if x is not None:
        check_float(name, x, shape, layout)


def check_state(name: str, x: Any, shape: tuple, layout: str) -> None:
    """Carried states are fp32 by contract."""
    if x is None:
        return
    check_float(name, x, shape, layout)
    if jnp.dtype(x.dtype) != jnp.float32:
        fail(name, f"a float32 array {layout} (states are fp32)", x)


def check_segment_ids(segment_ids: Any, B: int, T: int) -> None:
    if segment_ids is None:
        return
    if not hasattr(segment_ids, "shape") or not hasattr(segment_ids, "dtype"):
        fail("segment_ids", "an integer array [B, T]", segment_ids)
    if tuple(segment_ids.shape) != (B, T):
        fail("segment_ids", f"shape [B, T] = {_shape_str((B, T))}", segment_ids)
    if not jnp.issubdtype(segment_ids.dtype, jnp.integer):
        fail("segment_ids", f"an integer array [B, T] = {_shape_str((B, T))}", segment_ids)


def check_mixer_input(x: Any, hidden_size: int, segment_ids: Any) -> None:
    """A mixer's input: a float array ``x [B, T, hidden]`` and optional ``segment_ids [B, T]``."""
    if not hasattr(x, "ndim") or x.ndim != 3 or x.shape[-1] != hidden_size:
        fail("x", f"an array [B, T, hidden={hidden_size}]", x)
    if jnp.dtype(x.dtype) not in FLOAT_DTYPES:
        fail("x", "a float array [B, T, hidden]", x)
    check_segment_ids(segment_ids, x.shape[0], x.shape[1])


def check_chunk_size(chunk_size: Any) -> None:
    ok = isinstance(chunk_size, (int, np.integer)) and not isinstance(chunk_size, bool)
    if not ok or chunk_size < 1 or chunk_size & (chunk_size - 1):
        raise ValueError(f"chunk_size: expected a power of two (16, 32, 64, ...), got {chunk_size!r}")


def check_impl(impl: Any, known: tuple[str, ...]) -> None:
    if impl not in known:
        raise ValueError(f"impl: expected one of {', '.join(repr(i) for i in known)}, got {impl!r}")


def static_float(name: str, x: Any, *, allow_none: bool = False, minimum: float | None = None) -> float | None:
    """A Python float (these settings are compile-time constants, not traced arrays)."""
    if x is None and allow_none:
        return None
    try:
        value = float(x)
    except Exception:
        raise ValueError(f"{name}: expected a Python number{' or None' if allow_none else ''}, got {x!r}") from None
    if math.isnan(value) or (minimum is not None and value < minimum):
        bound = f" >= {minimum}" if minimum is not None else ""
        raise ValueError(f"{name}: expected a number{bound}, got {x!r}")
    return value


def require(ok: bool, field: str, expected: str, value: Any) -> None:
    """``ValueError("<field>: expected <expected>, got <value>")`` unless ``ok`` (config checks)."""
    if not ok:
        raise ValueError(f"{field}: expected {expected}, got {value!r}")
