"""EleutherAI lm-evaluation-harness (``pip install -e ".[eval]"``, module ``lm_eval``) on a training run.

    python -m osdn_jax.train.lm_eval_adapter --model_args run_dir=runs/tiny --tasks lambada_openai,hellaswag
    python -m osdn_jax.train.lm_eval_adapter --model_args run_dir=runs/tiny,step=2000 --batch_size 16 \\
        --tasks my_task --include_path my_tasks/ --limit 100

lm-eval finds models only through ``@register_model`` in modules it has imported (0.4.x has no
entry-point discovery), so the plain ``lm_eval`` command does not know ``osdn_jax``. This module
registers the model and then runs lm-eval's own command line with the arguments given (every
``lm_eval`` flag works; ``--model osdn_jax`` is added when missing, and ``--output_path`` defaults to
``RUN_DIR/eval/lm_eval``). From Python: ``import osdn_jax.train.lm_eval_adapter`` once, then
``lm_eval.simple_evaluate(model="osdn_jax", model_args="run_dir=...")``, or pass an ``OsdnJaxLM``.

model_args: ``run_dir`` (required; ``pretrained`` is an alias, which lm-eval uses to name its
output folder), ``step`` (default: the newest checkpoint), ``max_length`` (tokens a request may
hold; default the model's ``max_seq_len``), ``max_gen_toks`` (default 256), ``seed`` (sampling,
default 0). Rows per batch: lm-eval's ``--batch_size N`` (default here 8; ``auto`` means 8).

Requests (all on the local devices, in fixed-shape batches: rows padded to ``batch_size``, lengths
to a multiple of 128, so few programs are compiled):
  loglikelihood          sum of log p(continuation token | everything before), and whether every
                         continuation token is the argmax (``is_greedy``). Tokenisation as lm-eval's
                         causal models: the context's trailing spaces move to the continuation and
                         the continuation is ``encode(context + continuation)`` minus the context's
                         tokens; an empty context is replaced by EOS. Longer than ``max_length``:
                         the oldest context tokens are dropped.
  loglikelihood_rolling  lm-eval's rolling windows of ``max_length`` tokens (EOS first), disjoint,
                         summed: every token is predicted once.
  generate_until         greedy (or sampled when ``do_sample`` / ``temperature`` > 0) up to
                         ``max_gen_toks``; cut at EOS, then at the first of the ``until`` strings.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm.auto import tqdm

from osdn_jax.generate import generate
from osdn_jax.train.evaluate import load_run
from osdn_jax.train.recall import padded_length

MODEL_NAME = "osdn_jax"
DEFAULT_BATCH_SIZE = 8


@functools.partial(jax.jit, static_argnums=0)
def _token_logprobs(graphdef, state, inputs, segment_ids, targets):
    """``(log p(targets) [B, T], targets == argmax [B, T])`` under the model."""
    logits = nnx.merge(graphdef, state)(inputs, segment_ids)
    logp = jax.nn.log_softmax(logits, axis=-1)
    picked = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    return picked, jnp.argmax(logits, axis=-1) == targets


def _batches(order: Sequence[int], size: int) -> Iterator[list[int]]:
    for start in range(0, len(order), size):
        yield list(order[start:start + size])


class OsdnJaxLM(TemplateLM):
    """A training run's checkpoint as an lm-eval ``LM`` (see the module doc)."""

    def __init__(self, run_dir: str | None = None, step: int | None = None,
                 batch_size: int | str | None = DEFAULT_BATCH_SIZE, max_length: int | None = None,
                 max_gen_toks: int = 256, seed: int = 0, pretrained: str | None = None, **kwargs):
        super().__init__()
        run_dir = run_dir or pretrained  # lm-eval names its output folder after "pretrained"
        if not run_dir:
            raise ValueError(f"model_args: {MODEL_NAME} needs run_dir=RUN_DIR")
        kwargs.pop("device", None)  # lm-eval passes these to every model; JAX places arrays itself
        kwargs.pop("max_batch_size", None)
        if kwargs:
            raise ValueError(f"model_args: unknown arguments {sorted(kwargs)} for {MODEL_NAME}")
        self.run_dir = Path(run_dir)
        self.model, self._tok, self.cfg, self.step = load_run(run_dir, None if step is None else int(step))
        if batch_size in (None, "auto") or str(batch_size).startswith("auto"):
            batch_size = DEFAULT_BATCH_SIZE
        self.batch_size = int(batch_size)
        self.max_length = int(max_length or self.model.config.max_seq_len)
        self.max_gen_toks = int(max_gen_toks)
        self.seed = int(seed)
        if self.batch_size < 1 or self.max_length < 2 or self.max_gen_toks < 1:
            raise ValueError(f"model_args: need batch_size >= 1, max_length >= 2, max_gen_toks >= 1; got "
                             f"{self.batch_size}, {self.max_length}, {self.max_gen_toks}")
        self._graphdef, self._state = nnx.split(self.model)

    # -- TemplateLM's tokenizer interface -------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self._tok.eos_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return [int(t) for t in self._tok.encode(string)]

    def tok_decode(self, tokens: Sequence[int]) -> str:
        return self._tok.decode(list(tokens))

    @property
    def tokenizer_name(self) -> str:
        return f"{MODEL_NAME}-{self._tok.kind}-{self._tok.fingerprint}"

    # -- scoring ---------------------------------------------------------------------------------

    def score_tokens(self, pairs: Sequence[tuple[list[int], list[int]]], disable_tqdm: bool = True
                     ) -> list[tuple[float, bool]]:
        """``(sum log p, is_greedy)`` of each continuation (token ids) after its context (token ids,
        at least one unless the continuation holds two or more)."""
        seqs, n_cont = [], []
        for ctx, cont in pairs:
            whole = (list(ctx) + list(cont))[-(self.max_length + 1):]  # oldest context tokens go first
            if cont and len(whole) < 2:
                raise ValueError("loglikelihood: a request needs a context token before its continuation")
            seqs.append(whole)
            n_cont.append(min(len(cont), len(whole) - 1))
        results: list[tuple[float, bool]] = [(0.0, True)] * len(seqs)  # an empty continuation: log 1
        order = sorted((i for i in range(len(seqs)) if n_cont[i] > 0), key=lambda i: -len(seqs[i]))
        for idx in tqdm(list(_batches(order, self.batch_size)), desc="loglikelihood", disable=disable_tqdm):
            T = padded_length(max(len(seqs[i]) - 1 for i in idx), cap=self.max_length)
            inputs = np.zeros((self.batch_size, T), np.int32)
            targets = np.zeros((self.batch_size, T), np.int32)
            segments = np.zeros((self.batch_size, T), np.int32)  # right padding is its own segment (0)
            for row, i in enumerate(idx):
                n = len(seqs[i]) - 1
                inputs[row, :n], targets[row, :n], segments[row, :n] = seqs[i][:-1], seqs[i][1:], 1
            logp, greedy = _token_logprobs(self._graphdef, self._state, jnp.asarray(inputs), jnp.asarray(segments),
                                           jnp.asarray(targets))
            logp, greedy = np.asarray(logp, np.float64), np.asarray(greedy)
            for row, i in enumerate(idx):
                n, k = len(seqs[i]) - 1, n_cont[i]
                results[i] = (float(logp[row, n - k:n].sum()), bool(greedy[row, n - k:n].all()))
        return results

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        results = self.score_tokens([(ctx, cont) for _, ctx, cont in requests], disable_tqdm=disable_tqdm)
        for (key, _, _), result in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood", key, result)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owner = [], []
        for i, (text,) in enumerate(req.args for req in requests):
            for window in get_rolling_token_windows(self.tok_encode(text), prefix_token=self.prefix_token_id,
                                                    max_seq_len=self.max_length, context_len=1):
                windows.append(make_disjoint_window(window))
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, (logp, _) in zip(owner, self.score_tokens(windows, disable_tqdm=disable_tqdm)):
            totals[i] += logp
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", (req.args[0],), total)
        return totals

    # -- generation ------------------------------------------------------------------------------

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from lm_eval.models.utils import normalize_gen_kwargs

        results: list[str] = [""] * len(requests)
        groups: dict[str, list[int]] = {}  # requests with equal generation settings batch together
        settings = []
        for i, req in enumerate(requests):
            kw = normalize_gen_kwargs(dict(req.args[1]), default_max_gen_toks=self.max_gen_toks)
            settings.append(kw)
            groups.setdefault(repr(sorted((k, str(v)) for k, v in kw.items())), []).append(i)
        bar = tqdm(total=len(requests), desc="generate_until", disable=disable_tqdm)
        for members in groups.values():
            kw = settings[members[0]]
            max_new = int(kw["max_gen_toks"])
            until = [u for u in kw["until"] if u]
            temperature = float(kw.get("temperature", 0.0)) if kw.get("do_sample") else 0.0
            limit = min(self.max_length, self.model.config.max_seq_len)
            max_prompt = limit - max_new  # prompt + generation fit max_seq_len (KV caches too)
            if max_prompt < 1:
                raise ValueError(f"generate_until: max_gen_toks={max_new} leaves no room for a prompt in "
                                 f"{limit} tokens (max_length / max_seq_len)")
            prompts = {i: (self.tok_encode(requests[i].args[0]) or [self.eot_token_id])[-max_prompt:]
                       for i in members}
            order = sorted(members, key=lambda i: -len(prompts[i]))
            for idx in _batches(order, self.batch_size):
                batch = [prompts[i] for i in idx]
                batch += [batch[-1]] * (self.batch_size - len(batch))
                out = generate(self.model, batch, max_new, temperature=temperature,
                               top_k=kw.get("top_k"), top_p=kw.get("top_p"), seed=self.seed,
                               stop_token=self.eot_token_id, pad_to=padded_length(len(batch[0]), max_prompt),
                               vocab_limit=self._tok.vocab_size)
                for i, ids in zip(idx, out.as_lists()):
                    if self.eot_token_id in ids:
                        ids = ids[:ids.index(self.eot_token_id)]
                    text = self.tok_decode(ids)
                    for stop in until:
                        text = text.split(stop, 1)[0]
                    results[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
                bar.update(len(idx))
        bar.close()
        return results


def main(argv: list[str] | None = None) -> int:
    """lm-eval's command line with ``osdn_jax`` registered (see the module doc)."""
    from lm_eval._cli import HarnessCLI
    from lm_eval.utils import setup_logging

    setup_logging()
    sys.argv = ["lm_eval", *(sys.argv[1:] if argv is None else argv)]
    parser = HarnessCLI()
    args = parser.parse_args()  # reads sys.argv; "run" is implied, as with the lm_eval command
    if args.command == "run":
        if args.model is None and not getattr(args, "config", None):
            args.model = MODEL_NAME
        model_args = args.model_args if isinstance(args.model_args, dict) else {}
        if args.model == MODEL_NAME:
            if "batch_size" in model_args:  # lm-eval passes its own --batch_size too: one of them
                args.batch_size = str(model_args.pop("batch_size"))
            if getattr(args, "batch_size", None) is None:
                args.batch_size = str(DEFAULT_BATCH_SIZE)  # lm-eval's default is 1
            if "run_dir" in model_args and "pretrained" not in model_args:
                model_args["pretrained"] = model_args.pop("run_dir")  # names lm-eval's output folder
            if model_args.get("pretrained") and getattr(args, "output_path", None) is None:
                args.output_path = str(Path(model_args["pretrained"]) / "eval" / "lm_eval")
    parser.execute(args)
    return 0


if __name__ == "__main__":
    # Run through the importable module, which registers the model (this __main__ copy does not).
    from osdn_jax.train.lm_eval_adapter import main as _main

    sys.exit(_main())
else:
    register_model(MODEL_NAME)(OsdnJaxLM)

