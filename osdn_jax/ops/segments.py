"""Packed documents: where the recurrent state restarts."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def document_starts(segment_ids: jax.Array) -> jax.Array:
    """``[B, T]`` bool: True at every token whose id differs from the previous token's.

    Token 0 is never a start: the initial state (or ``initial_d``) belongs to the first document.
    """
    change = segment_ids[:, 1:] != segment_ids[:, :-1]
    return jnp.pad(change, ((0, 0), (1, 0)))


def document_index(segment_ids: jax.Array) -> jax.Array:
    """``[B, T]`` int32: 0 for the first document of each row, +1 at each id change.

    Two tokens share a document index exactly when no id change lies between them, so ids that
    repeat later in a row (``[0, 1, 0]``) still count as three documents.
    """
    return jnp.cumsum(document_starts(segment_ids).astype(jnp.int32), axis=1)


def chunk_document_numbers(segment_ids: jax.Array, C: int) -> tuple[jax.Array, jax.Array]:
    """Per chunk of C tokens (T padded to a multiple of C by repeating the last id):

    - ``doc [B, N, C]`` int32, the document index of each token (``document_index``);
    - ``rel [B, N, C]`` int32, how many documents started since the chunk began: 0 while a token is
      still in the document that was open at the end of the previous chunk (chunk 0: the first
      document), i.e. where the incoming state reaches.
    """
    B, T = segment_ids.shape
    doc = document_index(segment_ids)
    doc = jnp.pad(doc, ((0, 0), (0, (-T) % C)), mode="edge").reshape(B, -1, C)
    before = jnp.concatenate([jnp.zeros_like(doc[:, :1, -1]), doc[:, :-1, -1]], axis=1)  # [B, N]
    return doc, doc - before[..., None]


def chunk_documents(segment_ids: jax.Array, C: int) -> tuple[jax.Array, jax.Array]:
    """``doc [B, N, C]`` as in ``chunk_document_numbers`` and ``carry [B, N, C]`` bool, True where
    the incoming state reaches (no document has started since the chunk began)."""
    doc, rel = chunk_document_numbers(segment_ids, C)
    return doc, rel == 0
