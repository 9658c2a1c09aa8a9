"""Perplexity of a model on any corpus file, and its loss by position in the context window.

Documents are read with the training readers (``sources.py``: text, JSONL, ``.npy`` / ``.bin`` token
files) and the run's tokenizer, EOS-terminated when the run's ``append_eos`` is on, cut into pieces
of at most ``seq_len + 1`` tokens and packed into rows exactly like the held-out batches
(``data.iter_document_batches``; every document is used, there is no train / held-out split).

Accounting: the loss is the mean next-token cross-entropy over counted targets (``loss_mask``):
padding and the last position of each piece (whose target belongs to the next piece) are never
counted. Each target is counted once, so the mean is over documents' tokens, not over rows.

Position: the index of the input token within its piece (0 = the piece's first token, predicting
its second). States restart at every piece, so position p means the model has read p + 1 tokens
of context. The loss per position bucket says whether later positions — more context — are
predicted better, i.e. whether the model uses long context.
"""

from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path

import jax
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from osdn_jax.diagnostics import positions_in_piece
from osdn_jax.loss import DEFAULT_LOSS_CHUNK
from osdn_jax.model import CausalLM
from osdn_jax.train import data as data_lib, shards, sources
from osdn_jax.train.report import perplexity as ppl_of, save_figure
from osdn_jax.train.step import token_losses
from osdn_jax.train.tokenizer import Tokenizer

SOURCE_SUFFIXES = {
    "text": sources.TEXT_SUFFIXES,
    "jsonl": sources.JSONL_SUFFIXES,
    "npy": (".npy",),
    "bin": (".bin",),
}


def infer_source(path: str | Path) -> str:
    """``text`` / ``jsonl`` / ``npy`` / ``bin`` from a file's suffix, or from the kind of files under a
    directory (exactly one kind must be there); ``shards`` for a prepared folder."""
    p = Path(path)
    if not p.exists():
        raise ValueError(f"--data: {p} does not exist")
    if shards.is_prepared(p):
        return "shards"
    try:
        return sources.infer_kind(p, SOURCE_SUFFIXES, "text / JSONL / token files")
    except ValueError as e:
        raise ValueError(f"--source: {e}") from None


def position_buckets(seq_len: int, num_buckets: int | None = None) -> list[tuple[int, int]]:
    """Half-open position ranges covering ``[0, seq_len)``: ``[0,1), [1,2), [2,4), [4,8), ...`` (powers
    of two, the last one cut at ``seq_len``), or ``num_buckets`` ranges of equal width."""
    if num_buckets is None:
        edges = [0] + [1 << i for i in range(max(seq_len - 1, 1).bit_length()) if (1 << i) < seq_len] + [seq_len]
    else:
        if num_buckets < 1:
            raise ValueError(f"--buckets: expected an int >= 1, got {num_buckets}")
        edges = sorted({round(i * seq_len / num_buckets) for i in range(num_buckets + 1)})
    return list(itertools.pairwise(edges))


@dataclasses.dataclass
class PositionLoss:
    """Loss sums and counted targets per position ``[seq_len]`` (float64 / int64 on the host)."""

    loss_sum: np.ndarray
    tokens: np.ndarray

    @classmethod
    def zeros(cls, seq_len: int) -> PositionLoss:
        return cls(np.zeros(seq_len, np.float64), np.zeros(seq_len, np.int64))

    def add(self, losses: np.ndarray, mask: np.ndarray, segment_ids: np.ndarray) -> None:
        counted = mask > 0
        pos = positions_in_piece(segment_ids)[counted]
        T = self.tokens.shape[0]
        self.loss_sum += np.bincount(pos, weights=losses[counted].astype(np.float64), minlength=T)
        self.tokens += np.bincount(pos, minlength=T)

    @property
    def total_tokens(self) -> int:
        return int(self.tokens.sum())

    @property
    def mean_loss(self) -> float:
        return float(self.loss_sum.sum() / max(self.total_tokens, 1))

    def buckets(self, ranges: list[tuple[int, int]]) -> list[dict]:
        rows = []
        for lo, hi in ranges:
            n = int(self.tokens[lo:hi].sum())
            loss = float(self.loss_sum[lo:hi].sum() / n) if n else float("nan")
            rows.append({"lo": lo, "hi": hi, "tokens": n, "loss": loss, "ppl": ppl_of(loss) if n else float("nan")})
        return rows


def count_targets(cfg: data_lib.DataConfig, tokenizer: Tokenizer, doc_ids: np.ndarray | None = None) -> tuple[int, int]:
    """``(documents, next-token targets)`` of documents ``doc_ids`` (default: the whole source) under ``cfg``."""
    lengths = data_lib.load_documents(cfg, tokenizer).lengths
    lengths = (lengths if doc_ids is None else lengths[doc_ids]) + int(cfg.append_eos)
    return int(lengths.shape[0]), int(np.maximum(lengths - 1, 0).sum())


def evaluate_perplexity(model: CausalLM, tokenizer: Tokenizer, cfg: data_lib.DataConfig, *,
                        max_batches: int | None = None, progress: bool = True,
                        doc_ids: np.ndarray | None = None,
                        loss_chunk: int = DEFAULT_LOSS_CHUNK) -> tuple[PositionLoss, dict]:
    """Loss by position over documents ``doc_ids`` of ``cfg``'s source (default: every document; at
    most ``max_batches`` batches of ``cfg.batch_size`` rows of ``cfg.seq_len``). Returns the
    per-position sums and a summary dict (documents, batches, tokens, loss, ppl). ``loss_chunk``: the
    positions of each row whose logits exist at once (``osdn_jax.loss``)."""
    documents, total = count_targets(cfg, tokenizer, doc_ids)
    graphdef, params = nnx.split(model, nnx.Param)
    step = jax.jit(lambda p, b: token_losses(graphdef, p, b, loss_chunk))
    params = nnx.to_pure_dict(params)
    acc = PositionLoss.zeros(cfg.seq_len)
    batches = 0
    with tqdm(total=total, unit="tok", unit_scale=True, desc="ppl", disable=not progress) as bar:
        for batch in data_lib.iter_document_batches(cfg, tokenizer, doc_ids):
            if max_batches is not None and batches == max_batches:
                break
            losses = np.asarray(step(params, batch))
            acc.add(losses, batch["loss_mask"], batch["segment_ids"])
            batches += 1
            bar.update(int(batch["loss_mask"].sum()))
            bar.set_postfix(loss=f"{acc.mean_loss:.4f}", refresh=False)
    summary = {"documents": documents, "batches": batches, "tokens": acc.total_tokens,
               "tokens_in_source": total, "loss": acc.mean_loss, "ppl": ppl_of(acc.mean_loss)}
    return acc, summary


def plot_buckets(rows: list[dict], path: Path, title: str, log_x: bool) -> Path:
    """Mean loss per position bucket (a step line over each bucket's range) into ``path`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r["tokens"]]
    fig, ax = plt.subplots(figsize=(7, 4))
    for r in rows:  # position p sits on [p, p + 1): a bucket spans [lo, hi) on a log axis too
        ax.hlines(r["loss"], r["lo"] + 1, r["hi"] + 1, colors="tab:blue", lw=2)
    mid = [((r["lo"] + 1) * (r["hi"] + 1)) ** 0.5 if log_x else (r["lo"] + r["hi"]) / 2 + 1 for r in rows]
    ax.plot(mid, [r["loss"] for r in rows], "o", color="tab:blue", ms=4)
    if log_x:
        ax.set_xscale("log", base=2)
    ax.set_xlabel("tokens of context read (position in the window + 1)")
    ax.set_ylabel("loss (nats / token)")
    ax.set_title(title, fontsize=10)
    return save_figure(fig, ax, path)
