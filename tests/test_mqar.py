"""MQAR: the generator's layout and errors, and the grid's outputs and resume (tiny sizes)."""

import dataclasses
import json

import numpy as np
import pytest

from osdn_jax.train import mqar
from osdn_jax.train.mqar import IGNORE, Budget, GridConfig, make_mqar, query_positions


def test_layout_keys_values_and_queries():
    n, L, N, V = 64, 128, 8, 256
    inputs, targets = make_mqar(n, L, N, vocab_size=V, seed=3)
    assert inputs.shape == targets.shape == (n, L) and inputs.dtype == targets.dtype == np.int32
    keys, values = inputs[:, 0:2 * N:2], inputs[:, 1:2 * N:2]
    assert ((keys >= 1) & (keys < V // 2)).all() and ((values >= V // 2) & (values < V)).all()
    assert all(len(set(row)) == N for row in keys)  # distinct keys per example
    pos = query_positions(targets)
    assert pos.shape == (n, N) and (pos >= 2 * N).all() and ((pos - 2 * N) % 2 == 0).all()
    rows = np.arange(n)[:, None]
    for i in range(n):  # each key is queried exactly once and its target is its value
        asked = inputs[i, pos[i]]
        assert sorted(asked) == sorted(keys[i])
        lookup = dict(zip(keys[i], values[i]))
        assert [lookup[k] for k in asked] == targets[i, pos[i]].tolist()
    assert (targets[rows, pos] >= V // 2).all()
    assert (targets != IGNORE).sum() == n * N
    assert ((inputs >= 0) & (inputs < V)).all()


def test_same_seed_same_data_and_power_law_gaps():
    a = make_mqar(256, 256, 16, seed=7)
    b = make_mqar(256, 256, 16, seed=7)
    c = make_mqar(256, 256, 16, seed=8)
    assert all((x == y).all() for x, y in zip(a, b))
    assert not (a[0] == c[0]).all()
    gaps = (query_positions(a[1]) - 32) // 2  # slots 0 .. 111
    assert np.median(gaps) < 112 / 2 - 10  # short gaps are more likely than under a uniform draw


def test_warm_prefix_keeps_the_zoology_layout_after_it():
    """``prefix=P``: P unscored random tokens, then exactly the ``prefix=0`` row; ``prefix=0`` is the
    generator's output from before the prefix existed (its digest, pinned)."""
    import hashlib

    cold = make_mqar(8, 64, 4, vocab_size=256, seed=5)
    assert hashlib.sha256(cold[0].tobytes() + cold[1].tobytes()).hexdigest() == \
        "cded23e3b8fd0b8099a95ebdbba8d8619d83c915176f3a1d3ab95c6c56cff7a7"
    inputs, targets = make_mqar(8, 64, 4, vocab_size=256, seed=5, prefix=100)
    assert inputs.shape == targets.shape == (8, 164)
    assert (inputs[:, 100:] == cold[0]).all() and (targets[:, 100:] == cold[1]).all()
    assert (targets[:, :100] == IGNORE).all() and len(np.unique(inputs[:, :100])) > 100
    assert ((query_positions(targets) - 100) == query_positions(cold[1])).all()
    with pytest.raises(ValueError, match="prefix"):
        make_mqar(8, 64, 4, vocab_size=256, prefix=-1)


@pytest.mark.parametrize("kwargs, name", [
    (dict(num_examples=4, seq_len=60, num_pairs=16), "num_pairs, seq_len"),
    (dict(num_examples=4, seq_len=64, num_pairs=16, vocab_size=32), "vocab_size"),
    (dict(num_examples=0, seq_len=64, num_pairs=4), "num_examples"),
])
def test_bad_settings_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        make_mqar(**kwargs)


TINY = Budget(vocab_size=64, train_tokens=64 * 32, test_examples=32, epochs=1, batch_size=32, head_dim=16,
              curve_every=0)


def test_grid_writes_results_table_plot_and_resumes(tmp_path, capsys):
    cfg = GridConfig(out_dir=str(tmp_path), mixers=("osdn", "attention"), widths=(32,), settings=("32:4",),
                     lrs=(1e-2,), seeds=(0,), budget=TINY, progress=False)
    rows = mqar.run_grid(cfg)
    assert [(r["mixer"], r["width"], r["seq_len"], r["num_pairs"]) for r in rows] == [
        ("osdn", 32, 32, 4), ("attention", 32, 32, 4)]
    for r in rows:
        assert 0.0 <= r["accuracy"] <= 1.0 and r["steps"] == 2
    assert 0.0 < rows[0]["residual_ratio"] <= 1.0 and "residual_ratio" not in rows[1]
    assert (tmp_path / "mqar.png").stat().st_size > 0 and (tmp_path / "strength.png").stat().st_size > 0
    table = (tmp_path / "results.md").read_text()
    assert "| osdn | 32 |" in table and "| attention | 32 |" in table
    # Resume: a torn last line is redone, finished runs are not; a new lr adds only its runs.
    lines = (tmp_path / "results.jsonl").read_text().splitlines()
    (tmp_path / "results.jsonl").write_text(lines[0] + "\n" + lines[1][:20])
    capsys.readouterr()
    mqar.run_grid(cfg)
    assert "1 of 2 runs already" in capsys.readouterr().out
    wider = GridConfig(**{**cfg.__dict__, "lrs": (1e-2, 3e-2)})
    rows = mqar.run_grid(wider)
    assert "2 of 4 runs already" in capsys.readouterr().out
    assert len(rows) == 4
    assert len(mqar.best_per_cell(rows)) == 2
    stored = [json.loads(x) for x in (tmp_path / "results.jsonl").read_text().splitlines() if x.endswith("}")]
    assert len(stored) == 4


def test_learning_curves_strength_and_warm_runs_are_recorded_and_resumed(tmp_path, capsys):
    """``curve_every``: held-out accuracy every N steps (and at the end) in each row, kept when the
    grid resumes; delta-rule rows carry the write strength by position and OSDN rows the learned
    d0; rows written before ``prefix`` / ``curve_every`` existed still count for the default budget."""
    budget = Budget(vocab_size=64, train_tokens=64 * 48, test_examples=32, batch_size=16, head_dim=16,
                    curve_every=2, prefix=8)
    cfg = GridConfig(out_dir=str(tmp_path), mixers=("osdn-d1", "deltanet"), widths=(32,), settings=("32:4",),
                     lrs=(1e-2,), seeds=(0,), budget=budget, progress=False)
    rows = mqar.run_grid(cfg)
    for r in rows:
        assert r["steps"] == 6 and [s for s, _ in r["curve"]] == [2, 4, 6]
        assert r["curve"][-1][1] == pytest.approx(r["accuracy"], abs=1e-4)
        buckets = r["write_strength"]
        assert buckets[0]["lo"] == 0 and buckets[-1]["hi"] == 40 and sum(b["tokens"] for b in buckets) == 32 * 40
        pairs = r["pair_strength"]  # the key-value pairs sit after the 8 filler tokens
        assert (pairs["lo"], pairs["hi"], pairs["tokens"]) == (8, 16, 32 * 8)
    assert rows[0]["d0"][0]["layer"] == 0 and rows[1]["d0"] is None
    lines = (tmp_path / "results.jsonl").read_text().splitlines()
    (tmp_path / "results.jsonl").write_text(lines[0] + "\n" + lines[1][:30])
    capsys.readouterr()
    again = mqar.run_grid(cfg)
    assert "1 of 2 runs already" in capsys.readouterr().out
    assert [r["curve"] for r in again][0] == rows[0]["curve"] and len(again[1]["curve"]) == 3
    old = {k: v for k, v in dataclasses.asdict(TINY).items() if k not in ("prefix", "curve_every")}
    assert mqar.same_budget(old, TINY) and not mqar.same_budget(old, budget)


def test_grid_config_errors():
    with pytest.raises(ValueError, match="mixers"):
        GridConfig(mixers=("mamba",))
    with pytest.raises(ValueError, match="settings"):
        GridConfig(settings=("256-16",))


def _row(mixer, seed, acc, curve=(), prefix=0, **extra):
    budget = {**dataclasses.asdict(TINY), "prefix": prefix}
    return {"mixer": mixer, "width": 32, "seq_len": 32, "num_pairs": 4, "lr": 0.01, "seed": seed,
            "accuracy": acc, "curve": [list(c) for c in curve], "steps": 4, "budget": budget, **extra}


def test_report_table_means_over_seeds_and_strength_at_the_pairs():
    """The table: accuracy per seed, mean ± sample std, the write strength over the pairs (the
    row's own, or the token-weighted buckets inside [0, 2N) for rows from before it existed)."""
    from osdn_jax.train import mqar_report

    strength = [{"lo": 0, "hi": 1, "tokens": 10, "mean": 0.0}, {"lo": 1, "hi": 8, "tokens": 70, "mean": 0.4},
                {"lo": 8, "hi": 32, "tokens": 240, "mean": 0.9}]
    rows = [_row("osdn", 0, 0.2, write_strength=strength, d0=[{"mean": 0.5}, {"mean": 0.1}], residual_ratio=0.5),
            _row("osdn", 1, 0.6, write_strength=strength, d0=[{"mean": 0.1}, {"mean": 0.1}], residual_ratio=0.3),
            _row("attention", 0, 1.0), _row("attention", 1, 0.98)]
    assert mqar_report.pair_strength(rows[0]) == pytest.approx(0.4 * 70 / 80)
    assert mqar_report.pair_strength({**rows[0], "pair_strength": {"mean": 0.7}}) == 0.7
    assert mqar_report.pair_strength(_row("osdn", 0, 0.1, prefix=8, write_strength=strength)) is None
    assert mqar_report.mean_std([0.2, 0.6]) == pytest.approx((0.4, 0.2 * 2 ** 0.5))
    lines = mqar_report.table(rows).splitlines()
    assert lines[0].startswith("| mixer | width | L=32 N=4 seed 0 | L=32 N=4 seed 1 | L=32 N=4 mean ± std |")
    assert lines[2] == "| osdn | 32 | 0.200 | 0.600 | 0.400 ± 0.283 | 0.350 | 0.200 | 0.400 | 0.01 |"
    assert lines[3] == "| attention | 32 | 1.000 | 0.980 | 0.990 ± 0.014 | — | — | — | 0.01 |"


def test_report_compares_grids_side_by_side(tmp_path):
    """``mqar_report DIR DIR --labels ...``: a table per grid and the curve and strength plots; a
    directory holding runs of two budgets is refused."""
    from osdn_jax.train import mqar_report

    strength = [{"lo": 0, "hi": 8, "tokens": 80, "mean": 0.3}, {"lo": 8, "hi": 40, "tokens": 320, "mean": 0.6}]
    for name, prefix in (("cold", 0), ("warm", 8)):
        (tmp_path / name).mkdir()
        rows = [_row(m, s, 0.1 * s, curve=[(2, 0.05), (4, 0.1 * s)], prefix=prefix, write_strength=strength)
                for m in ("osdn", "deltanet") for s in (0, 1, 2)]
        (tmp_path / name / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert mqar_report.main([str(tmp_path / "cold"), str(tmp_path / "warm"), "--labels", "cold", "warm",
                             "--out-dir", str(tmp_path / "out")]) == 0
    text = (tmp_path / "out" / "mqar_compare.md").read_text()
    assert "**cold**" in text and "**warm**" in text and "0.100 ± 0.100" in text
    for png in ("mqar_compare.png", "mqar_compare_strength.png"):
        assert (tmp_path / "out" / png).read_bytes()[:4] == b"\x89PNG"
    with (tmp_path / "cold" / "results.jsonl").open("a") as f:
        f.write(json.dumps(_row("osdn", 3, 0.5, prefix=64)) + "\n")
    assert mqar_report.main([str(tmp_path / "cold"), "--out-dir", str(tmp_path / "out")]) == 2
