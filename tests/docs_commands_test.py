"""Every command in README.md and docs/*.md runs as written: the fenced bash blocks are read,
split into simple commands, and each is checked as cheaply as it can be on a CPU: config files
and paths exist, every ``--config.<field>=<value>`` parses against its config and passes the
config checks, the flags of train.py / eval.py and of the benchmark scripts exist, pip extras
exist; the synthetic-data command runs for real. Commands marked ``# GPU``, ``# TPU`` or
``# cluster`` get the same static checks but are never run."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
import pathlib
import re
import shlex
import sys

import pytest
from absl import flags
from ml_collections import config_flags

from cvmae_jax import config as config_module
from cvmae_jax.config_checks import EVAL_OVERRIDABLE, check_config

REPO = pathlib.Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
HARDWARE_MARK = re.compile(r"#\s*(GPU|TPU|cluster)\b")
# The flags other than --config.* that each entry point defines, and those it requires.
ENTRY_FLAGS = {"train.py": ({"config", "workdir"}, {"config", "workdir"}),
               "eval.py": ({"config", "workdir", "split", "step", "compare"}, {"workdir"}),
               "cvmae_jax.study": ({"config", "workdir"}, {"config", "workdir"}),
               "cvmae_jax.prepare": ({"config", "beam_options"}, {"config"}),
               "cvmae_jax.labels": ({"config", "task", "output_dir", "overwrite"},
                                    {"config", "task"})}
# Commands a user types that this check leaves alone (shell set-up, other tools).
NOT_CHECKED = {"cd", ".", "source", "ls", "cat", "head", "cp", "rsync", "mkdir", "tensorboard",
               "meds-evaluation", "meds-evaluation-cli", "export"}


@dataclasses.dataclass(frozen=True)
class Command:
    page: str
    line: str
    argv: tuple[str, ...]
    hardware: bool  # marked # GPU / # TPU / # cluster: checked, never run

    def __str__(self) -> str:
        return f"{self.page}: {' '.join(self.argv)}"


def bash_lines(text: str) -> list[str]:
    """The lines of the ```bash blocks of a markdown page, backslash continuations joined."""
    lines = []
    for block in re.findall(r"^```bash\n(.*?)^```", text, flags=re.S | re.M):
        for line in block.replace("\\\n", " ").splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                lines.append(line.strip())
    return lines


def simple_commands(argv: list[str]) -> list[list[str]]:
    """``a && b`` -> [a, b]; a leading ``VAR=value`` and an ``srun [options]`` prefix dropped;
    the ``--command="..."`` of ``gcloud ... ssh`` split into its own commands."""
    out, current = [], []
    for token in [*argv, "&&"]:
        if token in ("&&", ";"):
            while current and re.fullmatch(r"[A-Z_]+=\S*", current[0]):
                current = current[1:]
            if current and current[0] == "srun":
                current = current[next(i for i, t in enumerate(current) if t.startswith("python")):]
            if current and current[0] == "gcloud":
                inner = [t.split("=", 1)[1] for t in current if t.startswith("--command=")]
                out += [c for text in inner for c in simple_commands(shlex.split(text))]
            elif current:
                out.append(current)
            current = []
        else:
            current.append(token)
    return out


def doc_commands() -> list[Command]:
    commands = []
    for page in PAGES:
        for line in bash_lines(page.read_text()):
            hardware = bool(HARDWARE_MARK.search(line))
            for argv in simple_commands(shlex.split(line, comments=True)):
                commands.append(Command(page.name, line, tuple(argv), hardware))
    return commands


COMMANDS = doc_commands()


def test_the_docs_have_commands_and_python_snippets_that_compile():
    assert len(COMMANDS) > 40, [str(c) for c in COMMANDS]
    pages = {c.page for c in COMMANDS}
    assert {"README.md", "data.md", "training.md", "evaluation.md", "launching.md",
            "benchmarks.md"} <= pages
    for page in PAGES:
        for snippet in re.findall(r"^```python\n(.*?)^```", page.read_text(), flags=re.S | re.M):
            compile(snippet, str(page), "exec")


def test_the_readme_commands_are_what_ci_runs():
    ci = (REPO / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert ci in bash_lines((REPO / "README.md").read_text())


def test_the_readme_is_a_front_page():
    assert len((REPO / "README.md").read_text().split()) <= 1500


def test_every_config_field_is_in_the_reference():
    """docs/training.md's config table names each field of cvmae_jax/config.py, alone
    (`train.num_steps`), in a row of its section (`train.learning_rate`, `warmup_steps`) or
    with its section's fields (`eval.finetune.*`)."""
    rows = [line for line in (REPO / "docs" / "training.md").read_text().splitlines()
            if line.startswith("| `")]
    missing = []
    for field in sorted(_leaf_fields(config_module.default_config())):
        section, _, leaf = field.rpartition(".")
        sections = [field.rsplit(".", n)[0] for n in range(1, field.count(".") + 1)]
        if not any(f"`{field}`" in row or (section and f"`{section}." in row.split("|")[1]
                                           and f"`{leaf}`" in row.split("|")[1])
                   or any(f"`{s}.*`" in row.split("|")[1] for s in sections)
                   for row in rows):
            missing.append(field)
    assert not missing, f"config fields missing from docs/training.md: {missing}"


def _leaf_fields(config, prefix: str = "") -> set[str]:
    fields = set()
    for key, value in config.items():
        if hasattr(value, "items"):
            fields |= _leaf_fields(value, f"{prefix}{key}.")
        else:
            fields.add(f"{prefix}{key}")
    return fields


def _anchor(heading: str) -> str:
    """GitHub's anchor of a markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_the_links_between_pages_resolve():
    broken = []
    for page in PAGES:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            path, _, anchor = target.partition("#")
            if target.startswith("http"):
                continue
            linked = page.parent / path if path else page
            anchors = ({_anchor(h) for h in re.findall(r"^#+ (.*)$", linked.read_text(),
                                                       flags=re.M)}
                       if anchor and linked.is_file() else set())
            if not linked.exists() or (anchor and anchor not in anchors):
                broken.append(f"{page.name}: {target}")
    assert not broken, broken


HISTORY = re.compile(r"\bsessions? \d|\bissue #?\d|\breview|\buntil session|before this change",
                     flags=re.I)


def test_the_project_tells_no_development_history():
    """The software as it is and why; the experiment log (benchmarks/NOTES.md) is the place
    for what happened when."""
    files = [path for path in _project_text_files() if path != REPO / "benchmarks" / "NOTES.md"]
    found = [f"{path.relative_to(REPO)}:{number}: {line.strip()}"
             for path in files if path != pathlib.Path(__file__).resolve()
             for number, line in enumerate(path.read_text().splitlines(), 1)
             if HISTORY.search(line)]
    assert not found, "\n".join(found)


def _project_text_files() -> list[pathlib.Path]:
    """The project's source, config and documentation files (not .git, virtual environments,
    run folders or build metadata)."""
    files = []
    for folder, subfolders, names in os.walk(REPO):
        subfolders[:] = [d for d in subfolders if not d.startswith((".", "__"))
                         and d not in ("runs", "build", "dist") and not d.endswith(".egg-info")]
        files += [pathlib.Path(folder, n) for n in names
                  if n.endswith((".py", ".md", ".sh", ".yaml", ".yml", ".toml"))]
    return files


def _parse_config(config_file: str, overrides: list[str]):
    """The config of ``--config=FILE`` with the ``--config.<field>=<value>`` overrides applied,
    as the entry points parse it (a fresh flag registry)."""
    registry = flags.FlagValues()
    argv = ["prog", f"--config={config_file}", *overrides]
    config_flags.DEFINE_config_file("config", None, flag_values=registry, lock_config=True,
                                    sys_argv=argv)
    registry(argv)
    return registry.config


def _check_entry_point(entry: str, args: list[str]) -> None:
    options = [a for a in args if a.startswith("-")]
    names = {a.lstrip("-").split("=", 1)[0] for a in options}
    overrides = [a for a in options if a.startswith("--config.")]
    known, required = ENTRY_FLAGS[entry]
    unknown = {n[2:] if n.startswith("no") and n[2:] in known else n
               for n in names if not n.startswith("config.")} - known
    assert not unknown, f"no such flag: {sorted(unknown)}"
    assert required <= names, f"needs --{', --'.join(sorted(required - names))}"
    config_file = next((a.split("=", 1)[1] for a in options if a.startswith("--config=")),
                       None)
    if entry == "eval.py":
        assert config_file is None, "eval.py takes no config file"
        for name in (o.split("=", 1)[0][len("--config."):] for o in overrides):
            assert name.startswith(EVAL_OVERRIDABLE), f"eval.py cannot override {name}"
        config_file = config_module.__file__
    else:
        assert (REPO / config_file).is_file(), f"no config file {config_file}"
        config_file = str(REPO / config_file)
    check_config(_parse_config(config_file, overrides))


class _Parsed(Exception):
    """Raised instead of running a benchmark once its arguments parsed."""


def _check_benchmark(module: str, args: list[str], monkeypatch) -> None:
    try:
        importlib.import_module(module)
    except (ModuleNotFoundError, SystemExit) as error:  # no [bench] extra (torch) here
        pytest.skip(f"{module}: {error}")
    original = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, *_, **__):
        original(self, args)  # a bad argument exits with status 2
        raise _Parsed

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    with pytest.raises(_Parsed):
        sys.modules[module].main()


def _pip_extras(args: list[str]) -> None:
    section = (REPO / "pyproject.toml").read_text().split("[project.optional-dependencies]")[1]
    declared = re.findall(r"^(\w+) = \[", section.split("\n[")[0], flags=re.M)
    for arg in args:
        match = re.fullmatch(r"\.\[(.*)\]", arg)
        for extra in match.group(1).split(",") if match else ():
            assert extra in declared, f"pyproject.toml declares no extra {extra!r}"


@pytest.mark.parametrize("command", COMMANDS, ids=str)
def test_doc_command(command, monkeypatch, tmp_path):
    argv = list(command.argv)
    if argv[0] in ("python", "python3") and argv[1:3] == ["-m", "venv"]:
        return
    if argv[0] == "pip":
        assert argv[1] == "install"
        return _pip_extras(argv[2:])
    if argv[0] == "bash":
        assert (REPO / argv[1]).is_file(), f"no script {argv[1]}"
        return
    if argv[0] in NOT_CHECKED:
        return
    scripts = {"cvmae-train": ["train.py"], "cvmae-eval": ["eval.py"],
               "cvmae-prepare": ["-m", "cvmae_jax.prepare"],
               "cvmae-study": ["-m", "cvmae_jax.study"]}
    if argv[0] in scripts:  # pyproject.toml's console scripts
        argv = ["python", *scripts[argv[0]], *argv[1:]]
    assert argv[0] == "python", f"not a command this check knows: {command.line}"
    if argv[1] in ("train.py", "eval.py"):
        return _check_entry_point(argv[1], argv[2:])
    if argv[1].startswith("benchmarks/"):
        assert (REPO / argv[1]).is_file()
        return _check_benchmark("benchmarks." + pathlib.Path(argv[1]).stem, argv[2:],
                                monkeypatch)
    assert argv[1] == "-m", f"not a command this check knows: {command.line}"
    module, args = argv[2], argv[3:]
    if module in ENTRY_FLAGS:
        return _check_entry_point(module, args)
    if module.startswith("benchmarks."):
        return _check_benchmark(module, args, monkeypatch)
    if module == "pytest":
        for path in (a for a in args if not a.startswith("-")):
            assert (REPO / path.split("::")[0]).exists(), f"no test file {path}"
        return
    if module == "cvmae_jax.data.synthetic" and not command.hardware:
        from cvmae_jax.data import synthetic

        out_dir = tmp_path / "meds"
        synthetic.main([a if not a.startswith("--out_dir=") else f"--out_dir={out_dir}"
                        for a in args])
        assert (out_dir / "metadata" / "subject_splits.parquet").is_file()
        return
    pytest.fail(f"not a command this check knows: {command.line}")
