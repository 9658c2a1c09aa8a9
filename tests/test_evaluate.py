"""The evaluation commands (``osdn_jax.train.evaluate``): sample (and the old no-command form), ppl
with its loss-by-position accounting, JRT-style recall (scoring, truncation and prompt layout as pure
functions, then the CLI end to end), and the lm-evaluation-harness adapter (skipped without
``lm_eval``). One tiny randomly initialised run directory serves every test."""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from osdn_jax import CausalLM
from osdn_jax.generate import generate
from osdn_jax.train import data as data_lib, perplexity, recall
from osdn_jax.train.config import parse_args, to_dict
from osdn_jax.train.evaluate import load_run, main
from osdn_jax.train.step import loss_sums
from osdn_jax.train.tokenizer import ByteTokenizer, save_tokenizer

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
FDA = FIXTURES / "recall" / "fda_like.jsonl"
SQUAD = FIXTURES / "recall" / "squad_like.jsonl"
TINY = ["--model.hidden-size", "32", "--model.num-heads", "2", "--model.num-layers", "1", "--data.seq-len", "32",
        "--data.batch-size", "4"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> pathlib.Path:
    """A run directory as training leaves it (config, tokenizer, one checkpoint), with random weights."""
    d = tmp_path_factory.mktemp("run")
    cfg = parse_args(["--run-dir", str(d), *TINY])
    tok = ByteTokenizer()
    save_tokenizer(tok, d)
    (d / "config.json").write_text(json.dumps({"train": to_dict(cfg)}))
    model = CausalLM(cfg.model.build(tok.vocab_size, cfg.data.seq_len), rngs=nnx.Rngs(0))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    with ocp.CheckpointManager((d / "checkpoints").absolute()) as manager:
        manager.save(7, args=ocp.args.Composite(params=ocp.args.StandardSave(params)))
        manager.wait_until_finished()
    return d


def _record(path: pathlib.Path) -> dict:
    return json.loads(path.read_text())


# -- sample ----------------------------------------------------------------------------------------

def test_sample_and_the_old_command_form(run_dir, capsys):
    assert main([str(run_dir), "--tokens", "5", "--eval-batches", "1"]) == 0  # no command: sample
    out = capsys.readouterr().out
    assert "step 7" in out and "held-out loss" in out
    rec = _record(run_dir / "eval" / "sample-step7.json")
    assert rec["command"] == "sample" and rec["step"] == 7 and np.isfinite(rec["loss"]) and len(rec["sample"]) >= 1


def test_errors_name_the_argument_and_exit_2(run_dir, tmp_path, capsys):
    assert main(["ppl", str(run_dir), "--data", str(tmp_path / "missing.txt")]) == 2
    assert "--data:" in capsys.readouterr().err
    (tmp_path / "x.csv").write_text("a,b\n")
    assert main(["ppl", str(run_dir), "--data", str(tmp_path / "x.csv")]) == 2
    assert "--source:" in capsys.readouterr().err
    assert main(["recall", str(run_dir), "--data", str(FDA), "--answer-field", "nope"]) == 2
    err = capsys.readouterr().err
    assert "--answer-field:" in err and "fda_like.jsonl:1 has no field 'nope'" in err
    assert main(["sample", str(tmp_path)]) == 2
    assert "no config.json" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # argparse: a missing required flag
        main(["recall", str(run_dir)])
    assert e.value.code == 2


# -- ppl -------------------------------------------------------------------------------------------

def test_position_buckets_and_positions():
    assert perplexity.position_buckets(32) == [(0, 1), (1, 2), (2, 4), (4, 8), (8, 16), (16, 32)]
    assert perplexity.position_buckets(20) == [(0, 1), (1, 2), (2, 4), (4, 8), (8, 16), (16, 20)]
    assert perplexity.position_buckets(32, 4) == [(0, 8), (8, 16), (16, 24), (24, 32)]
    seg = np.array([[1, 1, 1, 2, 2, 0, 0], [1, 2, 2, 2, 2, 2, 3]])
    np.testing.assert_array_equal(perplexity.positions_in_piece(seg), [[0, 1, 2, 0, 1, 0, 1], [0, 0, 1, 2, 3, 4, 0]])
    assert perplexity.infer_source(FDA) == "jsonl"


def test_ppl_counts_every_target_once(run_dir, tmp_path):
    docs = ["In the beginning was the word.", "Short.", "A much longer document " * 6, "x"]
    (tmp_path / "corpus.txt").write_text("\n\n".join(docs) + "\n")
    assert main(["ppl", str(run_dir), "--data", str(tmp_path / "corpus.txt"), "--batch-size", "2",
                 "--no-progress"]) == 0
    rec = _record(run_dir / "eval" / "ppl-corpus-step7.json")
    assert (run_dir / "eval" / "ppl-corpus-step7.png").stat().st_size > 1000
    # every next-token target of every document (EOS appended): len(bytes) targets per document
    assert rec["tokens"] == rec["tokens_in_source"] == sum(len(d.encode()) for d in docs)
    assert sum(b["tokens"] for b in rec["buckets"]) == rec["tokens"] == sum(rec["by_position"]["tokens"])
    assert [(b["lo"], b["hi"]) for b in rec["buckets"]] == perplexity.position_buckets(32)
    # the loss equals the trainer's own sums over the same batches
    model, tok, cfg, _ = load_run(run_dir)
    cfg = data_lib.DataConfig(source="text", path=str(tmp_path / "corpus.txt"), seq_len=32, batch_size=2)
    graphdef, params = nnx.split(model, nnx.Param)
    step = jax.jit(lambda p, b: loss_sums(graphdef, p, b))
    sums = [step(params, b) for b in data_lib.iter_document_batches(cfg, tok)]
    total, count = (float(sum(s[i] for s in sums)) for i in (0, 1))
    assert count == rec["tokens"] and rec["loss"] == pytest.approx(total / count, rel=1e-5)
    assert rec["ppl"] == pytest.approx(np.exp(rec["loss"]))
    assert sum(rec["by_position"]["loss_sum"]) == pytest.approx(total, rel=1e-5)


def test_ppl_loss_chunk_gives_the_dense_loss(run_dir, tmp_path):
    """``--loss-chunk``: the logits 4 positions of a row at a time (8 chunks of the 32) or all at
    once give the same per-position losses; a negative chunk is refused."""
    (tmp_path / "corpus.txt").write_text("In the beginning was the word.\n\n" + "A longer document " * 8 + "\n")
    losses = []
    for chunk in ("0", "4"):
        assert main(["ppl", str(run_dir), "--data", str(tmp_path / "corpus.txt"), "--batch-size", "2",
                     "--no-progress", "--loss-chunk", chunk]) == 0
        losses.append(_record(run_dir / "eval" / "ppl-corpus-step7.json")["by_position"]["loss_sum"])
    np.testing.assert_allclose(losses[1], losses[0], rtol=1e-5, atol=1e-5)
    assert main(["ppl", str(run_dir), "--data", str(tmp_path / "corpus.txt"), "--loss-chunk", "-1"]) == 2


def test_strength_cli_matches_the_library(run_dir, capsys):
    from osdn_jax import diagnostics

    assert main(["strength", str(run_dir), "--data", str(FDA), "--batch-size", "2", "--max-batches", "2",
                 "--no-progress", "--buckets", "4"]) == 0
    assert "write strength by position" in capsys.readouterr().out
    rec = _record(run_dir / "eval" / "strength-fda_like-step7.json")
    assert (run_dir / "eval" / "strength-fda_like-step7.png").stat().st_size > 1000
    model, tok, _, _ = load_run(run_dir)
    cfg = data_lib.DataConfig(source="jsonl", path=str(FDA), seq_len=32, batch_size=2)
    batches = list(data_lib.iter_document_batches(cfg, tok))[:2]
    expected = diagnostics.write_strength_by_position(model, batches, perplexity.position_buckets(32, 4))
    assert [b["tokens"] for b in rec["buckets"]] == [b["tokens"] for b in expected["buckets"]]
    assert [b["mean"] for b in rec["buckets"]] == pytest.approx([b["mean"] for b in expected["buckets"]], rel=1e-6)
    assert rec["d0"] is not None and len(rec["d0"]) == 1  # the run's 1-layer OSDN


def test_ratio_cli_matches_the_library(run_dir, capsys):
    from osdn_jax import diagnostics

    assert main(["ratio", str(run_dir), "--data", str(FDA), "--batch-size", "2", "--max-batches", "2",
                 "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "recall residual ratio" in out and "all" in out
    rec = _record(run_dir / "eval" / "ratio-fda_like-step7.json")
    assert len(rec["per_layer"]) == 1 and len(rec["per_head"][0]) == 2 and 0 < rec["overall"] <= 1
    model, tok, _, _ = load_run(run_dir)
    cfg = data_lib.DataConfig(source="jsonl", path=str(FDA), seq_len=32, batch_size=2)
    batches = list(data_lib.iter_document_batches(cfg, tok))[:2]
    expected = diagnostics.recall_residual_ratio(model, batches)
    assert rec["tokens"] == expected["tokens"] and rec["overall"] == pytest.approx(expected["overall"], rel=1e-6)


# -- recall: pure functions ------------------------------------------------------------------------

def test_contains_and_newline_cut():
    tok = ByteTokenizer()
    assert recall.contains_answer("it is the ARCLINE pulse oximeter.", ["Arcline Pulse Oximeter"])
    assert not recall.contains_answer("Arcline", ["Arcline Pulse Oximeter"])
    assert recall.contains_answer("x", ["nope", "X"])
    ids = list(b" Vistel SpO2\nMonitor")
    assert recall.cut_generation(tok, ids) == " Vistel SpO2"
    assert recall.cut_generation(tok, list(b" ab") + [tok.eos_id] + list(b"cd\n")) == " ab"
    assert recall.cut_generation(tok, list(b"\nab")) == ""  # the harness' until=["\n"] does the same
    assert recall.newline_stop_token(tok) == ord("\n")


def test_split_prompt_rules():
    # 1: FDA / SWDE "key:" at the end, with the whitespace before it
    assert recall.split_prompt("doc text\nMore.\ndevice name:", {"key": "Device Name"}) == \
        ("doc text\nMore.", "\ndevice name:")
    # 2: SQuAD: text starts with the context
    assert recall.split_prompt("Ctx one. Ctx two. The answer is", {"context": " Ctx one. Ctx two. "}) == \
        ("Ctx one. Ctx two.", " The answer is")
    # 3: the last line
    assert recall.split_prompt("a\nb\nQ:", {}) == ("a\nb", "\nQ:")
    # 4: no separate question
    assert recall.split_prompt("one line only", {"key": "zzz"}) == ("one line only", "")
    for ex in recall.read_recall_jsonl(FDA) + recall.read_recall_jsonl(SQUAD):
        assert ex.question.strip() and ex.answers
    fda = recall.read_recall_jsonl(FDA, limit=2)
    assert [e.question for e in fda] == ["\ndevice name:", "\npredicate device:"] and fda[0].id == "K231001"
    squad = recall.read_recall_jsonl(SQUAD)
    assert squad[0].question == " The Harbour Lights festival was founded by" and squad[0].answers == ("Ansel Brody",)


def test_truncation_window_keeps_the_answer():
    rng = np.random.default_rng(0)
    for _ in range(2000):
        n, budget = int(rng.integers(1, 200)), int(rng.integers(1, 80))
        a = int(rng.integers(0, n))
        b = int(rng.integers(a + 1, n + 1))
        lo, hi = recall.truncation_window(n, budget, (a, b))
        assert 0 <= lo < hi <= n and hi - lo == min(n, budget)
        if b - a <= budget:
            assert lo <= a and b <= hi  # the whole answer is kept
        else:
            assert lo == a  # an answer longer than the budget keeps its start
        if a >= n - budget:
            assert (lo, hi) == (max(n - budget, 0), n)  # answer in the tail: cut from the left
        assert recall.truncation_window(n, budget, None) == (max(n - budget, 0), n)


def test_prompt_layout_once_twice_and_truncated():
    tok = ByteTokenizer()
    ex = recall.RecallExample("e", "Alpha beta. The code is QX-7. Gamma delta.", "\ncode:", ("QX-7",))
    ctx, q = list(ex.context.encode()), list(ex.question.encode())
    once = recall.build_prompt(tok, ex, twice=False, context_budget=1000, max_prompt_tokens=4000)
    assert once.ids == ctx + q and not once.truncated and once.answer_in_prompt
    twice = recall.build_prompt(tok, ex, twice=True, context_budget=1000, max_prompt_tokens=4000)
    assert twice.ids == ctx + [ord("\n")] + ctx + q  # context, context again, the question
    # a long context: the answer sits in the middle; 40 tokens around it are kept, in both copies
    long = recall.RecallExample("l", "filler words " * 30 + "The code is QX-7. " + "more filler " * 30, "\ncode:",
                                ("qx-7",))
    p = recall.build_prompt(tok, long, twice=True, context_budget=40, max_prompt_tokens=4000)
    assert p.truncated and p.answer_in_prompt and p.context_tokens == 40
    kept = bytes(p.ids[:40]).decode()
    assert "QX-7" in kept and p.ids == p.ids[:40] + [10] + p.ids[:40] + q
    # max_prompt_tokens lowers the budget: 2 copies + separator + question fit
    p = recall.build_prompt(tok, long, twice=True, context_budget=1000, max_prompt_tokens=70)
    assert len(p.ids) <= 70 and p.answer_in_prompt
    # no separable question: cut from the left, the end of the text stays
    text = "x" * 20 + " QX-7 " + "y" * 30 + " the answer is"
    p = recall.build_prompt(tok, recall.RecallExample("n", text, "", ("QX-7",)), twice=False, context_budget=10,
                            max_prompt_tokens=100)
    assert bytes(p.ids).decode() == text[-10:] and p.truncated and not p.answer_in_prompt


def test_generate_pad_to_changes_nothing(run_dir):
    model = load_run(run_dir)[0]
    prompts = [list(b"abc"), list(b"hello there")]
    a = generate(model, prompts, 6, temperature=0.0)
    b = generate(model, prompts, 6, temperature=0.0, pad_to=40)
    np.testing.assert_array_equal(a.tokens, b.tokens)


# -- recall: end to end ----------------------------------------------------------------------------

def test_recall_maps_predictions_back_to_their_examples(run_dir, monkeypatch):
    """A stand-in generator that answers from the prompt: every example must come back correct, so
    sorting by length, batching and padding rows never mix examples up."""
    model, tok, _, _ = load_run(run_dir)
    examples = recall.read_recall_jsonl(FDA) + recall.read_recall_jsonl(SQUAD)
    by_prompt = {}
    for ex in examples:
        p = recall.build_prompt(tok, ex, twice=False, context_budget=60, max_prompt_tokens=1000)
        by_prompt[bytes(p.ids)] = list((" " + ex.answers[0] + "\nignored").encode())

    def oracle(model, prompts, max_new_tokens, **kw):
        assert kw["pad_to"] % recall.PAD_MULTIPLE == 0 and kw["temperature"] == 0.0
        rows = [by_prompt[bytes(p)][:max_new_tokens] for p in prompts]
        width = max(map(len, rows))
        return type("G", (), {"as_lists": lambda self: rows, "tokens": np.zeros((len(rows), width))})()

    monkeypatch.setattr(recall, "generate", oracle)
    res = recall.evaluate_recall(model, tok, examples, context_budget=60, batch_size=5, progress=False)
    assert res["accuracy"] == 1.0 and res["examples"] == 12 and res["truncated"] > 0
    assert res["answer_in_prompt"] == 12  # the truncation kept every answer
    assert [r["prediction"] for r in res["predictions"]] == [" " + ex.answers[0] for ex in examples]


def test_recall_cli(run_dir, capsys):
    args = ["recall", str(run_dir), "--data", str(FDA), "--max-tokens", "4", "--context-budget", "64",
            "--no-progress", "--batch-size", "4"]
    assert main(args + ["--twice"]) == 0
    out = capsys.readouterr().out
    assert "accuracy" in out and "twice" in out
    rec = _record(run_dir / "eval" / "recall-fda_like-twice-step7.json")
    assert rec["examples"] == len(rec["predictions"]) == 6 and rec["twice"] and 0 <= rec["accuracy"] <= 1
    assert rec["truncated"] == 6 and rec["answer_in_prompt"] == 6
    assert {"id", "answers", "prediction", "correct", "prompt_tokens", "truncated"} <= set(rec["predictions"][0])
    assert all("\n" not in p["prediction"] for p in rec["predictions"])
    assert main(args + ["--limit", "2", "--out-dir", str(run_dir / "other")]) == 0  # plain prompts, 2 records
    rec = _record(run_dir / "other" / "recall-fda_like-step7.json")
    assert rec["examples"] == 2 and not rec["twice"] and rec["predictions"][0]["prompt_tokens"] < 100


# -- lm-evaluation-harness -------------------------------------------------------------------------

@nnx.jit
def _log_softmax(model, tokens):
    return jax.nn.log_softmax(model(tokens), axis=-1)


def _direct_logprob(model, ids: list[int], n_cont: int) -> tuple[float, bool]:
    """Sum of log p over the last ``n_cont`` tokens of ``ids`` from one plain forward pass (one row,
    zeros appended to a fixed length: a causal model's outputs before them do not change)."""
    tokens = np.zeros((1, 64), np.int32)
    tokens[0, :len(ids) - 1] = ids[:-1]
    logp = np.asarray(_log_softmax(model, jnp.asarray(tokens)))[0, :len(ids) - 1]
    tgt = np.asarray(ids[1:])
    picked = logp[np.arange(len(tgt)), tgt][-n_cont:]
    greedy = (logp.argmax(-1)[-n_cont:] == tgt[-n_cont:]).all()
    return float(picked.astype(np.float64).sum()), bool(greedy)


def test_lm_eval_adapter(run_dir):
    pytest.importorskip("lm_eval")
    from lm_eval import simple_evaluate
    from lm_eval.api.instance import Instance
    from lm_eval.tasks import TaskManager

    from osdn_jax.train.lm_eval_adapter import OsdnJaxLM

    lm = OsdnJaxLM(run_dir=str(run_dir), batch_size=4)
    model, eos = lm.model, lm.eot_token_id
    # token level: the model's own greedy continuation is greedy by construction, a changed one is not
    ctx = list(b"And God said")
    cont = generate(model, [ctx], 3, temperature=0.0).as_lists()[0]
    changed = [cont[0], (cont[1] + 1) % 256, cont[2]]
    scored = lm.score_tokens([(ctx, cont), (ctx, changed), (ctx[:3], ctx[3:])])
    for (c, x), got in zip([(ctx, cont), (ctx, changed), (ctx[:3], ctx[3:])], scored):
        want = _direct_logprob(model, c + x, len(x))
        assert got[0] == pytest.approx(want[0], rel=1e-4, abs=1e-4) and got[1] == want[1]
    assert scored[0][1] and not scored[1][1]
    # text level: lm-eval's requests (trailing context spaces move to the continuation; empty context: EOS)
    pairs = [("And God said", ", Let there be light"), ("", "Let there be light"), ("In the beginning ", "God")]
    got = lm.loglikelihood([Instance("loglikelihood", {}, pair, 0) for pair in pairs], disable_tqdm=True)
    for (c, x), (logp, greedy) in zip(pairs, got):
        c_ids = list(c.rstrip().encode()) or [eos]
        x_ids = list((c[len(c.rstrip()):] + x).encode())
        want = _direct_logprob(model, c_ids + x_ids, len(x_ids))
        assert logp == pytest.approx(want[0], rel=1e-4, abs=1e-4) and greedy == want[1]
    # rolling: one window (max_length covers the text) is the direct sum after EOS
    text = "In the beginning God created the heaven and the earth."
    roll = [Instance("loglikelihood_rolling", {}, (text,), 0)]
    (rolled,) = lm.loglikelihood_rolling(roll, disable_tqdm=True)
    ids = list(text.encode())
    assert rolled == pytest.approx(_direct_logprob(model, [eos] + ids, len(ids))[0], rel=1e-4)
    # windows of 16 inputs: every token predicted once, by a window of the (up to) 16 tokens before it
    (windowed,) = OsdnJaxLM(run_dir=str(run_dir), batch_size=4, max_length=16).loglikelihood_rolling(roll, True)
    full, ends = [eos] + ids, [*range(16, len(ids), 16), len(ids)]
    want = sum(_direct_logprob(model, full[max(e - 16, 0):e + 1], e - s)[0] for s, e in zip([0, *ends[:-1]], ends))
    assert windowed == pytest.approx(want, rel=1e-4)
    # the harness end to end: the model by its registered name, a multiple-choice and a generate_until task
    tm = TaskManager(include_path=str(FIXTURES / "lm_eval"), include_defaults=False)
    res = simple_evaluate(model="osdn_jax", model_args={"run_dir": str(run_dir)}, tasks=["osdn_mc", "osdn_gen"],
                          task_manager=tm, batch_size=4, log_samples=True)
    assert 0 <= res["results"]["osdn_mc"]["acc,none"] <= 1
    assert 0 <= res["results"]["osdn_gen"]["exact_match,none"] <= 1
    assert all("\n" not in s["resps"][0][0] for s in res["samples"]["osdn_gen"])
    sample = res["samples"]["osdn_mc"][0]  # each choice scored as " " + choice after the question
    for choice, resp in zip(sample["doc"]["choices"], sample["resps"]):
        c_ids, x_ids = list(sample["doc"]["question"].encode()), list((" " + choice).encode())
        assert float(resp[0][0]) == pytest.approx(_direct_logprob(model, c_ids + x_ids, len(x_ids))[0], rel=1e-4)
