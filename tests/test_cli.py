"""The command lines read well and the docs' references resolve.

``--help`` of ``python -m osdn_jax.train`` (and its ``evaluate`` / ``mqar`` entry points) names the
command as it is typed and gives every flag a help line; ``--data.path`` is never silently ignored;
every relative link, anchor and repository path in README.md and docs/*.md exists.
"""

import json
import pathlib
import re
import subprocess
import sys

import pytest

from osdn_jax.train import evaluate, mqar
from osdn_jax.train.config import DataConfig, TrainConfig, load_config_file, parse_args

ROOT = pathlib.Path(__file__).parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


# -- --help ------------------------------------------------------------------------------------

def _help(capsys, monkeypatch, main, argv=("--help",)) -> str:
    """What ``main(argv)`` prints before exiting 0 (80 columns: tyro lays the groups out one below
    the other)."""
    monkeypatch.setenv("COLUMNS", "80")
    with pytest.raises(SystemExit) as e:
        main(list(argv))
    assert e.value.code == 0
    return capsys.readouterr().out


def _flag_help(out: str) -> dict[str, str]:
    """``{flag: its help text without "(default: ...)"}`` from tyro's ``--help`` (boxed or not): an
    entry is the flag and its metavar, two or more spaces, then the help, continued (or started) on
    the lines below that are indented further than the flag."""
    entries: dict[str, list[str]] = {}
    flag, flag_indent = None, 0
    for line in out.splitlines():
        body = line.replace("│", " ")
        text, indent = body.strip(), len(body) - len(body.lstrip())
        if text.startswith("-") and not set(text) <= set("-─"):
            head, *rest = re.split(r"\s{2,}", text, maxsplit=1)
            flag, flag_indent = head.split()[0].rstrip(","), indent
            entries[flag] = rest
        elif flag is not None and text and indent > flag_indent:
            entries[flag].append(text)
        else:
            flag = None  # a blank line, a rule, a group's title or description
    return {f: re.sub(r"\(default: .*\)$", "", " ".join(p)).strip() for f, p in entries.items()}


def test_train_help_names_the_command_and_helps_every_flag(capsys, monkeypatch):
    out = _help(capsys, monkeypatch, parse_args)
    assert out.startswith("usage: python -m osdn_jax.train ")
    helps = _flag_help(out)
    assert {"--steps", "--data.path", "--data.batch-size", "--mesh.context", "--log.every"} <= set(helps)
    assert not [f for f, h in helps.items() if not h], "flags without help"
    assert {f for f in helps if f.startswith("--data.")} == {
        "--data." + f.name.replace("_", "-") for f in DataConfig.__dataclass_fields__.values()}


def test_train_help_describes_the_batch_once(capsys, monkeypatch):
    """``data.batch_size``: the global batch, rows over data × fsdp and time over context, said in
    its own help line (not in a wall of field notes in the data group's description)."""
    out = _help(capsys, monkeypatch, parse_args)
    batch = _flag_help(out)["--data.batch-size"]
    for words in ("global", "mesh.data", "mesh.fsdp", "mesh.context"):
        assert words in batch, (words, batch)
    assert "process" not in batch.replace("processes", "")  # not "per process"
    assert "batch_size:" not in out and "tokenizer_path:" not in out  # DataConfig's field table


def test_evaluate_help_is_complete(capsys, monkeypatch):
    out = _help(capsys, monkeypatch, evaluate.main)
    assert out.startswith("usage: python -m osdn_jax.train.evaluate ")
    for name, cmd in evaluate.COMMANDS.items():
        assert name in out and " ".join(cmd.help.split()) in " ".join(out.split())
    flat = " ".join(out.split())
    assert "Every command takes --step N" in flat.replace("``", "") and "lm_eval_adapter" in flat
    assert out.rstrip().endswith("."), out[-200:]
    for name in evaluate.COMMANDS:
        sub = _help(capsys, monkeypatch, evaluate.main, [name, "--help"])
        assert sub.startswith(f"usage: python -m osdn_jax.train.evaluate {name} ")
    parser = evaluate.build_parser()
    subparsers = next(a for a in parser._actions if a.dest == "command").choices
    missing = [(name, a.dest) for name, p in subparsers.items() for a in p._actions if not (a.help or "").strip()]
    assert not missing, f"evaluate flags without help: {missing}"


def test_mqar_help_names_the_command_and_helps_every_flag(capsys, monkeypatch):
    out = _help(capsys, monkeypatch, mqar.main)
    assert out.startswith("usage: python -m osdn_jax.train.mqar ")
    helps = _flag_help(out)
    assert "--budget.epochs" in helps and "--widths" in helps
    assert not [f for f, h in helps.items() if not h], "flags without help"


# -- --data.path -------------------------------------------------------------------------------

def test_metrics_help_is_help_not_a_run_dir():
    out = subprocess.run([sys.executable, "-m", "osdn_jax.train.metrics", "--help"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("usage: python -m osdn_jax.train.metrics") and "no metrics yet" not in out.stdout


def test_data_path_with_the_embedded_source_is_an_error(capsys, tmp_path):
    """The embedded corpus reads no path, so a ``--data.path`` without ``--data.source`` fails
    naming both flags, instead of training on the embedded corpus."""
    with pytest.raises(SystemExit) as e:
        parse_args(["--data.path", "/nonexistent/corpus"])
    assert e.value.code == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "data.path" in err and "data.source" in err and "/nonexistent/corpus" in err, err
    with pytest.raises(ValueError, match=r"data\.path.*data\.source"):
        TrainConfig(data=DataConfig(path="corpus/"))
    with pytest.raises(ValueError, match=r"its suffix says --data\.source npy"):
        TrainConfig(data=DataConfig(path="tokens.npy"))
    f = tmp_path / "run.json"
    f.write_text(json.dumps({"data": {"path": "corpus.jsonl"}}))
    with pytest.raises(ValueError, match=r"data\.path.*data\.source"):
        load_config_file(f)
    cfg = parse_args(["--data.source", "jsonl", "--data.path", "corpus.jsonl"])  # with a source: fine
    assert (cfg.data.source, cfg.data.path) == ("jsonl", "corpus.jsonl")


# -- README.md and docs/*.md -------------------------------------------------------------------

def _without_code_blocks(text: str) -> str:
    return re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)


def _anchors(md: pathlib.Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    headings = re.findall(r"^#{1,6}\s+(.*?)\s*#*$", _without_code_blocks(md.read_text()), flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}


def _links(md: pathlib.Path) -> list[str]:
    return re.findall(r"\]\(([^)\s]+)\)", _without_code_blocks(md.read_text()))


def _broken_links(md: pathlib.Path) -> list[str]:
    broken = []
    for link in _links(md):
        if re.match(r"[a-z]+:", link):  # https:, mailto:
            continue
        path, _, anchor = link.partition("#")
        target = (md.parent / path).resolve() if path else md
        if not target.exists() or not target.resolve().is_relative_to(ROOT.resolve()):
            broken.append(link)
        elif anchor and target.suffix == ".md" and anchor not in _anchors(target):
            broken.append(link)
    return broken


def test_markdown_links_and_anchors_resolve():
    assert _links(ROOT / "README.md"), "README has no links to check"
    broken = {md.name: _broken_links(md) for md in DOCS}
    assert not any(broken.values()), broken


TOP_DIRS = ("docs", "benchmarks", "tests", "train", "kernels", "osdn_jax")
PACKAGE_DIRS = {"osdn_jax.train": "train", "osdn_jax.kernels": "kernels", "osdn_jax": "osdn_jax"}


def _module_exists(module: str) -> bool:
    """``python -m module`` has a file here (packages mapped to folders as in pyproject.toml)."""
    package = next(p for p in sorted(PACKAGE_DIRS, key=len, reverse=True)
                   if module == p or module.startswith(p + "."))
    base = ROOT / PACKAGE_DIRS[package] / pathlib.Path(*module.split(".")[package.count(".") + 1:])
    return (base / "__main__.py").is_file() or base.with_suffix(".py").is_file()


def _missing_paths(text: str, where: pathlib.Path) -> list[str]:
    """Repository files that ``text`` (a file in the folder ``where``) names and that do not exist:
    ``docs/x.md``, ``benchmarks/y.py``, ``SPEC.md``, ``python -m osdn_jax.z``."""
    missing = []
    for path in re.findall(rf"(?<![\w/.-])((?:{'|'.join(TOP_DIRS)})/[\w/.-]*\w\.(?:md|py|png))\b", text):
        if not (ROOT / path).is_file():
            missing.append(path)
    for name in re.findall(r"`([A-Z][A-Z_]*\.md)`", text):  # SPEC.md, README.md, CONTRIBUTING.md
        if not ((ROOT / name).is_file() or (where / name).is_file()):
            missing.append(name)
    for module in re.findall(r"python -m (osdn_jax[\w.]*\w)", text):
        if not _module_exists(module):
            missing.append(f"python -m {module}")
    return missing


def test_paths_named_in_the_docs_exist():
    """The old README named the project's ``SPEC.md``, which the repository does not have."""
    missing = {md.name: _missing_paths(md.read_text(), md.parent) for md in DOCS}
    assert not any(missing.values()), missing
    old = "The exact math is in the project's `SPEC.md`; run `python benchmarks/nope.py`."
    assert _missing_paths(old, ROOT) == ["benchmarks/nope.py", "SPEC.md"]


def test_spec_is_self_contained():
    """docs/spec.md states the math itself: no pointers to files outside the repository."""
    spec = (ROOT / "docs" / "spec.md").read_text()
    assert "SPEC.md" not in spec and "../shared" not in spec and "shared/" not in spec
    assert "docs/spec.md" in (ROOT / "README.md").read_text()
