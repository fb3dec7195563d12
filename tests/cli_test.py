"""The command lines as a user types them: train.py and eval.py with config overrides."""

import json
import multiprocessing
import os
import shutil
import subprocess
import sys
from unittest import mock

import pytest

from cvmae_jax.config import default_config
from cvmae_jax.jsonio import check_writable
from cvmae_jax.workdir import read_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--config.data.synthetic_subjects=40", "--config.data.max_len=32",
        "--config.model.d_model=32", "--config.model.num_layers=1",
        "--config.train.num_steps=6", "--config.train.batch_size=8",
        "--config.train.log_every=3", "--config.train.eval_every=6",
        "--config.train.checkpoint_every=6", "--config.eval.batch_size=8"]


def run(script, *args):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, os.path.join(REPO, script), *args], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A run trained by train.py on 2 CPU devices: (workdir, its stdout + stderr)."""
    workdir = str(tmp_path_factory.mktemp("cli") / "run")
    result = run("train.py", "--config=configs/demo.py", f"--workdir={workdir}", *TINY,
                 "--config.masking.strategy=random", "--config.parallel.cpu_devices=2")
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir, result.stdout + result.stderr


def test_train_then_eval_from_the_command_line(trained):
    workdir, log = trained
    assert "step 6/6" in log and "ETA" in log
    assert "Training on 2 cpu device(s)" in log
    assert "orbax" not in log.lower()  # libraries' INFO lines are filtered out (-v=1 shows them)
    assert "Using custom data configuration" not in log and "Downloading" not in log  # tfds
    with open(os.path.join(workdir, "config.json")) as f:
        assert json.load(f)["masking"]["strategy"] == "random"
    result = run("eval.py", f"--workdir={workdir}", "--config.eval.single_code=False",
                 "--split=tuning")
    assert result.returncode == 0, result.stderr[-3000:]
    with open(os.path.join(workdir, "eval_tuning", "metrics.json")) as f:
        metrics = json.load(f)
    assert metrics["split"] == "tuning" and "single_code" not in metrics  # override applied
    for phase in ("reconstruction on tuning", "downstream probes (2 task(s))",
                  "perturbation sensitivity"):  # progress lines of the long parts
        assert f"eval: {phase}" in result.stderr, result.stderr[-2000:]
    assert "single-code" not in result.stderr and "eval: done in" in result.stderr
    assert "orbax" not in result.stderr.lower() and "read only" not in result.stderr
    assert not os.path.exists(os.path.join(workdir, "eval"))  # held_out results have their own


@pytest.mark.parametrize("args, message", [
    (["--config=configs/demo.py"], "--config=configs/demo.py: eval.py reads the run's "
                                   "config.json; change single fields with"),
    (["--config.model.d_model=64"], "--config.model.d_model: eval.py evaluates the run as "
                                    "trained"),
    (["--split=test"], "--split='test': unknown split; have ['held_out', 'train', 'tuning']"),
    (["--config.eval.labels_dir=/nonexistent/labels"],
     "config.eval.labels_dir=/nonexistent/labels: no such folder"),
])
def test_eval_refuses_bad_arguments(trained, args, message):
    workdir, _ = trained
    result = run("eval.py", f"--workdir={workdir}", *args)
    assert result.returncode == 1 and f"error: {message}" in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr


def test_eval_without_a_checkpoint_writes_nothing(tmp_path):
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "config.json").write_text(json.dumps(default_config().to_dict()))
    result = run("eval.py", f"--workdir={workdir}")
    assert result.returncode == 1
    assert "checkpoints: no complete checkpoint to evaluate" in result.stderr
    assert os.listdir(workdir) == ["config.json"]


def test_verbose_flag_shows_the_traceback(tmp_path):
    result = run("train.py", "--config=configs/demo.py", f"--workdir={tmp_path / 'run'}",
                 "--config.masking.p_high=1.5", "-v=1")
    assert result.returncode == 1 and "Traceback" in result.stderr
    assert "error: config.masking.p_high=1.5: a masking probability" in result.stderr


@pytest.mark.parametrize("config, override, message", [
    ("meds", "--config.seed=0", "config.data.meds_dir is required"),
    ("demo", "--config.masking.strategy=spans", "config.masking.strategy='spans'"),
    ("demo", "--config.train.batch_size=12", "config.train.batch_size=12 must be divisible"),
    ("demo", "--config.parallel.cpu_devices=3", "must be divisible by the number of devices (3)"),
    ("demo", "--config.model.attention=cudnn", "needs config.model.dtype in ('bfloat16',)"),
    ("demo", "--config.data.lab_code_pattern=^LAB//(", "not a valid regular expression"),
    ("demo", "--config.model.num_heads=3", "must be divisible by config.model.num_heads=3"),
    ("demo", "--config.data.clip_quantiles=(0.999,0.001)", "0 <= low < high <= 1"),
    ("demo", "--config.parallel.cpu_devices=-2", "config.parallel.cpu_devices=-2: expected"),
    ("demo", "--config.parallel.distributed=True", "config.parallel.distributed: "
                                                   "jax.distributed.initialize failed ("),
    ("demo", "--config.data.lab_codes=LAB//X", "1 requested lab_codes have no numeric train "
                                               "rows"),  # after the synthetic data is made
])
def test_bad_settings_fail_before_writing_anything(tmp_path, config, override, message):
    workdir = tmp_path / "run"
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    result = subprocess.run(
        [sys.executable, os.path.join(REPO, "train.py"), f"--config=configs/{config}.py",
         f"--workdir={workdir}", *TINY, override],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode != 0
    assert message in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert not workdir.exists()


@pytest.mark.parametrize("script, args, message", [
    ("train.py", ["--config=configs/demo.py", "--config.train.steps=5"],
     "error: --config.train.steps: no such config field; did you mean --config.train.num_steps "
     "or --config.train.warmup_steps?"),
    ("eval.py", ["--config.eval.lables_dir=/labels"],
     "error: --config.eval.lables_dir: no such config field; did you mean "
     "--config.eval.labels_dir?"),
    ("train.py", ["--config=configs/study.py", "--config.study.seed=1"],
     "did you mean --config.study.seeds?"),  # a field only that config file has
    ("train.py", ["--config=configs/demo.py", "--config.model.xyz=1"],
     "error: --config.model.xyz: no such config field (config.model has: attention, d_model,"),
    ("eval.py", ["--config.eval.xyz=1"], "batch_size, finetune.*, label_max_len,"),
])
def test_an_unknown_config_field_is_one_line_naming_it(tmp_path, script, args, message):
    result = run(script, f"--workdir={tmp_path / 'run'}", *args)
    assert result.returncode == 1 and message in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr and not (tmp_path / "run").exists()


def test_unwritable_paths_fail_in_one_line_before_the_work(trained, tmp_path):
    (tmp_path / "a_file").write_text("")
    result = run("train.py", "--config=configs/demo.py", f"--workdir={tmp_path}/a_file/run")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert (f"error: {tmp_path}/a_file/run: cannot write there ({tmp_path}/a_file is not a "
            "folder: it is a file); train.py writes the run there (--workdir)\n"
            == result.stderr), result.stderr[-2000:]
    result = run("train.py", "--config=configs/demo.py", f"--workdir={tmp_path}/run",
                 f"--config.data.data_dir={tmp_path}/a_file/data")
    assert result.returncode == 1 and result.stderr.endswith(
        "the dataset is prepared there (config.data.data_dir)\n"), result.stderr[-2000:]
    assert not (tmp_path / "run").exists()
    for folder, purpose in (("checkpoints", "checkpoints are saved there"),
                            ("data", "the dataset is prepared there")):
        workdir = tmp_path / f"run_with_{folder}_file"  # a file where train.py needs a folder
        workdir.mkdir()
        (workdir / folder).write_text("")
        result = run("train.py", "--config=configs/demo.py", f"--workdir={workdir}")
        assert (result.returncode == 1 and f"error: {workdir}/{folder}: cannot write there "
                f"({workdir}/{folder} is not a folder: it is a file); {purpose}"
                in result.stderr), result.stderr[-2000:]
        assert sorted(p.name for p in workdir.iterdir()) == [".train.lock", folder]
    for script in ("train.py", "eval.py"):
        result = run(script, "--workdir=", *(["--config=configs/demo.py"] * (script == "train.py")))
        assert result.returncode == 1 and "an unset shell variable?" in result.stderr, (
            result.stderr[-2000:])
    study = [sys.executable, "-m", "cvmae_jax.study", "--config=configs/study.py"]
    result = subprocess.run([*study, f"--workdir={tmp_path}/a_file"], cwd=REPO,
                            capture_output=True, text=True, timeout=600,
                            env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert (f"error: {tmp_path}/a_file: cannot write there ({tmp_path}/a_file is not a "
            "folder: it is a file); the study writes its runs and report there (--workdir)\n"
            == result.stderr and result.returncode == 1), result.stderr[-2000:]
    result = subprocess.run([*study, f"--workdir={tmp_path}/study", "--config.study.seeds=(0.5,)"],
                            cwd=REPO, capture_output=True, text=True, timeout=600,
                            env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert result.stderr.endswith("error: config.study.seeds=(0.5,): expected integers in "
                                  "[0, 2**32), e.g. --config.study.seeds='(0, 1, 2)'\n"), (
        result.stderr[-2000:])  # this package's own refusal: no "raised in __main__"
    workdir = tmp_path / "run"  # eval's results folder cannot be created: refused up front
    shutil.copytree(trained[0], workdir)
    shutil.rmtree(workdir / "eval", ignore_errors=True)
    (workdir / "eval").write_text("")
    result = run("eval.py", f"--workdir={workdir}")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert (f"error: {workdir}/eval: cannot write there ({workdir}/eval is not a folder: it is "
            "a file); "
            "eval.py writes its results there") in result.stderr
    assert "reconstruction on held_out" not in result.stderr  # before any evaluation


def test_a_folder_the_file_system_refuses_is_named_in_words(tmp_path):
    refused = PermissionError(1, "Operation not permitted")
    with mock.patch("tempfile.mkdtemp", side_effect=refused), pytest.raises(
            ValueError, match=f"^{tmp_path}/run: cannot write there \\({tmp_path} refuses new "
                              "files: operation not permitted\\); train.py writes"):
        check_writable(tmp_path / "run", "train.py writes the run there (--workdir)")
    assert list(tmp_path.iterdir()) == []


def test_a_url_workdir_is_refused_in_one_line_creating_nothing(tmp_path):
    for script in ("train.py", "eval.py"):
        result = subprocess.run(
            [sys.executable, os.path.join(REPO, script), "--workdir=gs://bucket/runs/demo",
             *([f"--config={REPO}/configs/demo.py"] * (script == "train.py"))], cwd=tmp_path,
            capture_output=True, text=True, timeout=600, env=dict(os.environ, JAX_PLATFORMS="cpu"))
        assert result.returncode == 1 and result.stderr.count("\n") == 1 and (
            "gs://bucket/runs/demo: a URL, not a folder" in result.stderr) and (
            "mount the bucket (Cloud Storage FUSE, s3fs, ...) and pass the mount's path"
            in result.stderr), result.stderr[-2000:]
        assert list(tmp_path.iterdir()) == []  # no local folder named gs:


@pytest.mark.parametrize("arg, expanded", [
    ("--workdir=~/runs/demo", "--workdir={home}/runs/demo"),
    ("--config.data.meds_dir=~/MEDS", "--config.data.meds_dir={home}/MEDS"),
    ("--config.eval.labels_dir=~", "--config.eval.labels_dir={home}"),
    ("--config=~/my_config.py", "--config={home}/my_config.py"),
    ("--task=~/tasks/mortality.yaml", "--task={home}/tasks/mortality.yaml"),
    ("--config.data.lab_code_pattern=~LAB", "--config.data.lab_code_pattern=~LAB"),
    ("--workdir=runs/~demo", "--workdir=runs/~demo"),
])
def test_a_tilde_the_shell_leaves_in_a_path_flag_is_expanded(monkeypatch, arg, expanded):
    from cvmae_jax import cli

    monkeypatch.setenv("HOME", "/home/someone")
    assert cli.expand_home(arg) == expanded.format(home="/home/someone")


def test_eval_with_a_workdir_under_the_home_tilde_reads_it_there(tmp_path):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    result = subprocess.run([sys.executable, os.path.join(REPO, "eval.py"),
                             "--workdir=~/runs/demo"], cwd=cwd, capture_output=True, text=True,
                            timeout=600, env=dict(os.environ, JAX_PLATFORMS="cpu",
                                                  HOME=str(tmp_path)))
    assert result.returncode == 1 and (f"error: {tmp_path}/runs/demo/config.json: missing"
                                       in result.stderr), result.stderr[-2000:]
    assert list(cwd.iterdir()) == []


def test_evaluating_a_file_says_it_is_not_a_workdir(tmp_path):
    (tmp_path / "a_file").write_text("")
    with pytest.raises(ValueError, match=f"^{tmp_path}/a_file: a file, not a folder; --workdir "
                                         "is the folder train.py wrote the run to$"):
        read_config(str(tmp_path / "a_file"))


def test_eval_overrides_apply_to_the_run_config_and_are_checked(tmp_path):
    from cvmae_jax.evaluation.run_eval import run_config_with

    saved = default_config().to_dict()
    (tmp_path / "config.json").write_text(json.dumps(saved))
    config = run_config_with(str(tmp_path), {"eval.labels_dir": "/labels",
                                             "eval.mask_rate": 0.5, "eval.finetune.steps": 3})
    assert config.eval.labels_dir == "/labels" and config.eval.mask_rate == 0.5
    assert config.eval.finetune.steps == 3
    assert config.model.d_model == saved["model"]["d_model"]
    with pytest.raises(ValueError, match=r"^config.eval.mask_rate=0.0: expected a rate"):
        run_config_with(str(tmp_path), {"eval.mask_rate": 0.0})
    with pytest.raises(ValueError, match=r"^--config.eval.split, --config.parallel.cpu_devices: "
                                         r"eval.py evaluates the run as trained"):
        run_config_with(str(tmp_path), {"eval.split": "tuning", "parallel.cpu_devices": 2})


def test_eval_settings_a_run_was_saved_without_take_their_defaults(tmp_path):
    from cvmae_jax.evaluation.run_eval import run_config_with

    saved = default_config().to_dict()
    saved["eval"]["finetune"]["steps"] = 7
    del saved["eval"]["finetune"]["scratch"], saved["eval"]["sample_seed"]
    (tmp_path / "config.json").write_text(json.dumps(saved))
    config = run_config_with(str(tmp_path), {})
    assert config.eval.finetune.scratch is True and config.eval.sample_seed == 0
    assert config.eval.finetune.steps == 7  # the run's own settings are kept


def test_an_error_raised_inside_a_library_names_it():
    """A ValueError of this package is one plain line; one raised inside a library names the
    exception and the module (it may be a bug; -v=1 shows the traceback)."""
    from cvmae_jax import cli
    from cvmae_jax.config_checks import check_eval_config

    config = default_config()
    config.eval.mask_rate = 0.0
    with pytest.raises(SystemExit) as ours, cli.user_errors():
        check_eval_config(config.eval)
    assert str(ours.value) == "error: config.eval.mask_rate=0.0: expected a rate in (0, 1]"
    with pytest.raises(SystemExit) as theirs, cli.user_errors():
        json.loads("{not json")
    assert str(theirs.value).endswith("(JSONDecodeError raised in json; -v=1 shows the "
                                      "traceback)")
    from cvmae_jax.data.array_record_writer import write_part

    with multiprocessing.get_context("spawn").Pool(1) as pool, pytest.raises(
            SystemExit) as in_a_worker, cli.user_errors():  # raised again in multiprocessing
        pool.apply(write_part, ("/no/such/folder/part", [b"x"]))
    assert str(in_a_worker.value).startswith("error: /no/such/folder/part: could not write the "
                                             "prepared records (")
    assert "raised in" not in str(in_a_worker.value)


def test_ctrl_c_is_one_line_and_exit_status_130(capsys):
    from cvmae_jax import cli

    with pytest.raises(SystemExit) as interrupted, cli.user_errors(
            resumes="train.py resumes from its last checkpoint"):
        raise KeyboardInterrupt
    assert interrupted.value.code == 130
    assert capsys.readouterr().err == (
        "interrupted (Ctrl-C); rerun the same command (train.py resumes from its last "
        "checkpoint)\n")
    with pytest.raises(SystemExit), cli.user_errors():  # eval.py: nothing to resume
        raise KeyboardInterrupt
    assert capsys.readouterr().err == "interrupted (Ctrl-C); rerun the same command\n"


def test_sigterm_before_training_is_one_line_and_exit_status_0(capsys):
    from cvmae_jax import cli
    from cvmae_jax.preemption import Preempted

    with pytest.raises(SystemExit) as stopped, cli.user_errors():
        raise Preempted("preempted (SIGTERM) before the first training step")
    assert stopped.value.code == 0
    assert capsys.readouterr().err == "preempted (SIGTERM) before the first training step\n"


def test_sigterm_during_an_evaluation_is_one_line_and_exit_status_143(capsys):
    from cvmae_jax import cli
    from cvmae_jax.preemption import Terminated

    with pytest.raises(SystemExit) as stopped, cli.user_errors():
        raise Terminated("terminated (SIGTERM) during the evaluation")
    assert stopped.value.code == 143
    assert capsys.readouterr().err == "terminated (SIGTERM) during the evaluation\n"


@pytest.mark.parametrize("text, message", [
    (None, "error: --config={path}: no such file (relative to "),
    ("def get_config(:\n", "error: --config={path}: line 1: "),
    ("X = 1\n", "error: --config={path}: ValueError: {path}: no get_config() function"),
    ("def get_config():\n    return 1 / 0\n", "error: --config={path}: ZeroDivisionError: "),
    ("import ml_collections\n\n\ndef get_config():\n"
     "    return ml_collections.ConfigDict({'seed': 0})\n", "error: the config lacks data, "),
])
def test_a_config_file_that_is_missing_or_broken_is_one_line(tmp_path, text, message):
    path = tmp_path / "mine.py"
    if text is not None:
        path.write_text(text)
    result = run("train.py", f"--config={path}", f"--workdir={tmp_path / 'run'}")
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert message.format(path=path) in result.stderr and result.stderr.count("\n") == 1
    assert not (tmp_path / "run").exists()


def test_a_config_file_takes_an_argument_after_a_colon(tmp_path):
    """``--config=FILE:ARG`` calls ``get_config(ARG)``, as ml_collections does."""
    path = tmp_path / "sized.py"
    path.write_text("from cvmae_jax.config import sibling_config\n\n\n"
                    "def get_config(size):\n"
                    f"    config = sibling_config({str(REPO + '/configs/demo.py')!r}, 'demo')\n"
                    "    config.model.d_model = int(size)\n"
                    "    config.train.num_stepz = 1\n"
                    "    return config\n")
    result = run("train.py", f"--config={path}:48", f"--workdir={tmp_path / 'run'}")
    assert result.returncode == 1, result.stderr[-2000:]
    assert result.stderr.endswith("error: config.train.num_stepz: no such config field (set by "
                                  "the config file; the fields are cvmae_jax/config.py's); did "
                                  "you mean config.train.num_steps?\n"), result.stderr[-2000:]



def test_a_librarys_error_keeps_its_line_not_its_traceback_on_the_console():
    """Orbax logs an error with a traceback per thread of a failed save; the console keeps the
    lines (-v=1, which installs no filter, keeps the tracebacks too), and this package's
    tracebacks stay."""
    import logging

    from cvmae_jax import cli

    try:
        raise ValueError("RESOURCE_EXHAUSTED")
    except ValueError:
        exc_info = sys.exc_info()

    def error_from(path):
        return logging.LogRecord("absl", logging.ERROR, path, 1, "save failed", None, exc_info)

    library = error_from("/venv/site-packages/orbax/checkpoint/future.py")
    ours = error_from(os.path.join(cli.PACKAGE_DIR, "checkpoint.py"))
    console = cli._ThisPackageInfoOnly()
    assert console.filter(library) and library.exc_info is None
    assert console.filter(ours) and ours.exc_info is exc_info
