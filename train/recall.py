"""In-context recall in the style of JRT ("Just read twice", Arora et al. 2024) on JSONL files shaped
like the FDA / SWDE / SQuAD-completion sets (``hazyresearch/based-fda``, ``based-swde``,
``based-squad``): read a document, then complete a question about it from memory.

Records (field names configurable; the defaults match those sets):
  text     the whole prompt: the document (context) followed by the question prefix, e.g.
           ``"<document>\\nmanufacturer:"`` (FDA / SWDE) or ``"<passage> <statement to complete>"``.
  value    the answer: a string, a list of accepted strings, or a SQuAD ``{"text": [...]}`` dict.
  key      optional (FDA / SWDE): the attribute asked for; ``text`` ends with ``key:``.
  context  optional (SQuAD): the passage; ``text`` starts with it.
  doc_id / id   optional, copied to the predictions.

Splitting ``text`` (stripped) into context + question, first rule that applies:
  1. ``key`` is present and ``text`` ends with ``key + ":"`` (any case): the question is that
     suffix together with the whitespace before it (``"\\nmanufacturer:"``).
  2. ``context`` is present and ``text`` starts with it (stripped): the question is the rest.
  3. ``text`` has a newline: the question is the last line, from the last ``"\\n"`` on.
  4. Otherwise there is no separate question: the whole text is the context.
``context + question == text`` always, so the plain prompt is exactly the record's text.

Prompt tokens: ``encode(context) + encode(question)``; with ``twice`` (the JRT prompt)
``encode(context) + encode("\\n") + encode(context) + encode(question)``.

Truncation: the budget counts the tokens of ONE copy of the context (``context_budget``, lowered
where needed so the prompt plus ``max_tokens`` fits ``max_seq_len``); the question is never cut. A
context of n > B tokens keeps a window of B consecutive tokens:
  * the last B tokens (cut from the left) when the answer's last occurrence in the context lies
    inside them, when the answer does not occur in the context, or when there is no separate
    question (rule 4: the end of the text is the question and must stay);
  * otherwise B tokens centred on the answer's last occurrence (its token span widened by one
    token each side, for BPE merges at its edges), moved inside ``[0, n)``; an answer longer than B
    keeps its first B tokens.
"Occurrence" is a case-insensitive substring match of any accepted answer. ``answer_in_prompt``
records whether the kept context still contains an answer (the decoded window, same match).

Decoding: greedy (``generate(temperature=0)``) for up to ``max_tokens`` tokens; the generation is
cut at the first EOS, decoded, and cut at its first ``"\\n"`` (so byte-level and BPE tokenizers, whose
newline may be merged into a longer token, behave alike). Rows stop early on the newline token
when the tokenizer spells ``"\\n"`` as one token. Score: correct when an accepted answer is a
case-insensitive substring of the cut generation (the "contains" metric of the JRT / Based
evaluations).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from osdn_jax.generate import generate
from osdn_jax.model import CausalLM
from osdn_jax.train import sources
from osdn_jax.train.tokenizer import Tokenizer

PAD_MULTIPLE = 128  # prompts are left-padded to a multiple of this: fewer compiled shapes


@dataclasses.dataclass(frozen=True)
class RecallExample:
    id: str
    context: str
    question: str
    answers: tuple[str, ...]


# ---------------------------------------------------------------------------------------------
# Reading records


def _answers(value, where: str, field: str) -> tuple[str, ...]:
    if isinstance(value, dict) and "text" in value:  # SQuAD: {"text": [...], "answer_start": [...]}
        value = value["text"]
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(a, str) for a in items):
        raise ValueError(f"--answer-field: {where} field {field!r} must be a string, a list of strings or "
                         f"{{'text': [...]}}, got {type(value).__name__}")
    answers = tuple(a.strip() for a in items if a.strip())
    if not answers:
        raise ValueError(f"--answer-field: {where} field {field!r} holds no non-empty answer")
    return answers


def split_prompt(text: str, record: dict, *, context_field: str | None = "context",
                 key_field: str | None = "key") -> tuple[str, str]:
    """``(context, question)`` with ``context + question == text`` (rules 1-4 of the module doc)."""
    key = record.get(key_field) if key_field else None
    if isinstance(key, str) and key.strip():
        tail = key.strip() + ":"
        if text.lower().endswith(tail.lower()):
            i = len(text) - len(tail)
            while i > 0 and text[i - 1].isspace():
                i -= 1
            if i > 0:
                return text[:i], text[i:]
    context = record.get(context_field) if context_field else None
    if isinstance(context, str) and context.strip():
        c = context.strip()
        if text.startswith(c) and len(text) > len(c):
            return text[: len(c)], text[len(c):]
    i = text.rfind("\n")
    if i > 0:
        return text[:i], text[i:]
    return text, ""


def read_recall_jsonl(path: str | Path, *, text_field: str = "text", answer_field: str = "value",
                      context_field: str | None = "context", key_field: str | None = "key",
                      limit: int | None = None) -> list[RecallExample]:
    """The examples of a JSONL file (or every ``*.jsonl[.gz]`` under a directory), in order."""
    if not Path(path).exists():
        raise ValueError(f"--data: {path} does not exist")
    examples: list[RecallExample] = []
    for f in sources.list_files(path, sources.JSONL_SUFFIXES):
        for n, line in enumerate(sources._read_text_file(f).split("\n"), start=1):
            if limit is not None and len(examples) >= limit:
                return examples
            if not line.strip():
                continue
            where = f"{f}:{n}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"--data: {where} is not valid JSON ({e.msg})") from None
            if not isinstance(record, dict):
                raise ValueError(f"--data: {where} is not a JSON object")  # noqa: TRY004 (the CLI's error type)
            for flag, field in (("--text-field", text_field), ("--answer-field", answer_field)):
                if field not in record:
                    raise ValueError(f"{flag}: {where} has no field {field!r} (fields: {sorted(record)})")
            text = record[text_field]
            if not isinstance(text, str) or not text.strip():
                raise ValueError(f"--text-field: {where} field {text_field!r} must be a non-empty string")
            context, question = split_prompt(text.strip(), record, context_field=context_field,
                                             key_field=key_field)
            ident = record.get("doc_id", record.get("id", f"{f.name}:{n}"))
            examples.append(RecallExample(str(ident), context, question,
                                          _answers(record[answer_field], where, answer_field)))
    if not examples:
        raise ValueError(f"--data: {path} holds no records")
    return examples


# ---------------------------------------------------------------------------------------------
# Scoring and prompts (pure functions)


def contains_answer(prediction: str, answers: Sequence[str]) -> bool:
    """Whether any accepted answer is a case-insensitive substring of ``prediction``."""
    p = prediction.lower()
    return any(a.lower() in p for a in answers)


def cut_generation(tokenizer: Tokenizer, ids: Sequence[int]) -> str:
    """The generated text up to its first EOS and then its first newline."""
    ids = list(ids)
    if tokenizer.eos_id in ids:
        ids = ids[: ids.index(tokenizer.eos_id)]
    return tokenizer.decode(ids).split("\n", 1)[0]


def answer_char_span(context: str, answers: Sequence[str]) -> tuple[int, int] | None:
    """``[start, end)`` in ``context`` of the last case-insensitive occurrence of any answer (the
    one starting last), or None."""
    low = context.lower()
    best = None
    for a in answers:
        i = low.rfind(a.lower())
        if i >= 0 and (best is None or i > best[0]):
            best = (i, i + len(a))
    return best


def truncation_window(n: int, budget: int, span: tuple[int, int] | None) -> tuple[int, int]:
    """``[lo, hi)`` of the context tokens kept under ``budget`` (the rule in the module doc);
    ``span`` is the answer's token span or None (then: cut from the left)."""
    if n <= budget:
        return 0, n
    if span is None or span[0] >= n - budget:
        return n - budget, n
    a, b = span
    if b - a >= budget:
        return a, a + budget
    lo = min(max(a - (budget - (b - a)) // 2, 0), n - budget)
    return lo, lo + budget


@dataclasses.dataclass(frozen=True)
class RecallPrompt:
    ids: list[int]
    context_tokens: int  # tokens of one (kept) copy of the context
    truncated: bool
    answer_in_prompt: bool


def build_prompt(tokenizer: Tokenizer, ex: RecallExample, *, twice: bool, context_budget: int,
                 max_prompt_tokens: int) -> RecallPrompt:
    """The (truncated) prompt of one example; ``max_prompt_tokens`` caps the whole prompt."""
    ctx = [int(t) for t in tokenizer.encode(ex.context)]
    question = [int(t) for t in tokenizer.encode(ex.question)]
    sep = [int(t) for t in tokenizer.encode("\n")] if twice else []
    copies = 2 if twice else 1
    budget = min(context_budget, (max_prompt_tokens - len(question) - len(sep)) // copies)
    if budget < 1:
        raise ValueError(f"--context-budget: example {ex.id}: its question ({len(question)} tokens) leaves no room "
                         f"for context in a prompt of at most {max_prompt_tokens} tokens (max_seq_len minus "
                         f"--max-tokens)")
    span = None
    char_span = answer_char_span(ex.context, ex.answers) if ex.question else None
    if char_span is not None and len(ctx) > budget:
        s, e = char_span
        a = len(tokenizer.encode(ex.context[:s]))
        b = len(tokenizer.encode(ex.context[:e]))
        span = (max(a - 1, 0), min(b + 1, len(ctx)))
    lo, hi = truncation_window(len(ctx), budget, span)
    kept = ctx[lo:hi]
    ids = kept + sep + kept + question if twice else kept + question
    in_prompt = contains_answer(tokenizer.decode(kept), ex.answers)
    return RecallPrompt(ids, len(kept), hi - lo < len(ctx), in_prompt)


def newline_stop_token(tokenizer: Tokenizer) -> int:
    """The token to stop rows on: the newline when it is one token, else EOS."""
    nl = tokenizer.encode("\n")
    return int(nl[0]) if len(nl) == 1 else tokenizer.eos_id


def padded_length(n: int, cap: int, multiple: int = PAD_MULTIPLE) -> int:
    """``n`` rounded up to a multiple of ``multiple``, at most ``cap`` (and at least ``n``)."""
    return max(n, min(-(-n // multiple) * multiple, cap))


# ---------------------------------------------------------------------------------------------
# Evaluation


def evaluate_recall(model: CausalLM, tokenizer: Tokenizer, examples: Sequence[RecallExample], *,
                    twice: bool = False, max_tokens: int = 48, context_budget: int = 1000, batch_size: int = 8,
                    progress: bool = True) -> dict:
    """Greedy recall on ``examples``: a summary plus ``predictions`` (one dict per example, in order)."""
    if max_tokens < 1:
        raise ValueError(f"--max-tokens: expected an int >= 1, got {max_tokens}")
    if context_budget < 1:
        raise ValueError(f"--context-budget: expected an int >= 1, got {context_budget}")
    if batch_size < 1:
        raise ValueError(f"--batch-size: expected an int >= 1, got {batch_size}")
    max_prompt = model.config.max_seq_len - max_tokens  # also fits an attention model's KV cache
    prompts = [build_prompt(tokenizer, ex, twice=twice, context_budget=context_budget,
                            max_prompt_tokens=max_prompt) for ex in examples]
    stop = newline_stop_token(tokenizer)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i].ids))  # similar lengths batch together
    generated: list[str] = [""] * len(prompts)
    for start in tqdm(range(0, len(order), batch_size), desc="recall", unit="batch", disable=not progress):
        idx = order[start:start + batch_size]
        batch = [prompts[i].ids for i in idx]
        batch += [batch[-1]] * (batch_size - len(batch))  # a fixed batch shape
        out = generate(model, batch, max_tokens, temperature=0.0, stop_token=stop,
                       pad_to=padded_length(max(map(len, batch)), max_prompt), vocab_limit=tokenizer.vocab_size)
        for i, ids in zip(idx, out.as_lists()):
            generated[i] = cut_generation(tokenizer, ids)
    rows = []
    for i, (ex, prompt, text) in enumerate(zip(examples, prompts, generated)):
        rows.append({"index": i, "id": ex.id, "answers": list(ex.answers), "prediction": text,
                     "correct": contains_answer(text, ex.answers), "prompt_tokens": len(prompt.ids),
                     "truncated": prompt.truncated, "answer_in_prompt": prompt.answer_in_prompt})
    n = len(rows)
    correct = sum(r["correct"] for r in rows)
    return {
        "examples": n,
        "correct": correct,
        "accuracy": correct / n if n else float("nan"),
        "mean_prompt_tokens": float(np.mean([r["prompt_tokens"] for r in rows])) if n else 0.0,
        "truncated": sum(r["truncated"] for r in rows),
        "answer_in_prompt": sum(r["answer_in_prompt"] for r in rows),
        "twice": twice,
        "max_tokens": max_tokens,
        "context_budget": context_budget,
        "predictions": rows,
    }
