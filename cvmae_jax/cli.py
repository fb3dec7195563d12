"""Command-line entry points (absl flags + ml_collections config files)."""

from __future__ import annotations

import contextlib
import difflib
import logging as std_logging
import os
import re
import sys

import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from cvmae_jax import config as config_module
from cvmae_jax.config_checks import check_config, eval_overridable, field_names
from cvmae_jax.data.meds import MEDSFormatError
from cvmae_jax.jsonio import MOUNT_HINT, check_writable, is_url
from cvmae_jax.preemption import Preempted, Terminated
from cvmae_jax.host_memory import reuse_freed_memory

FLAGS = flags.FLAGS


def define_common_flags(config_required: bool) -> None:
    """--config (a file in configs/, or for eval.py only field overrides of the run's
    config.json) and --workdir."""
    if config_required:
        config_flags.DEFINE_config_file(
            "config", None, "Path to a config file in configs/ (fields can be overridden with "
            "--config.<field>=<value>).", lock_config=True)
        flags.mark_flags_as_required(["config"])
    else:
        config_flags.DEFINE_config_file(
            "config", config_module.__file__, "Not a file here: override fields of the run's "
            f"config.json with --config.<field>=<value> ({eval_overridable()}).",
            lock_config=True)
    flags.DEFINE_string("workdir", None, "Run directory (outputs, checkpoints).", required=True)


def _train(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from cvmae_jax.train import train_and_evaluate

    log_progress()
    with user_errors(resumes="train.py resumes from its last checkpoint"):
        check_config(FLAGS.config)
        check_writable(FLAGS.workdir, "train.py writes the run there (--workdir)")
        train_and_evaluate(FLAGS.config, FLAGS.workdir)


def _eval(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    log_progress()
    with user_errors():
        if not FLAGS.workdir.strip():
            raise ValueError("--workdir is empty (an unset shell variable?): name the training "
                             "run's folder, or with --compare the report's")
        if is_url(FLAGS.workdir):
            raise ValueError(f"--workdir={FLAGS.workdir}: a URL, not a folder; {MOUNT_HINT}")
        if FLAGS.compare:
            from cvmae_jax.evaluation.compare import compare_runs

            if eval_overrides() or FLAGS.step is not None:
                raise ValueError("--compare reads the runs' eval/metrics.json and takes no "
                                 "--config.<field> overrides or --step")
            check_writable(FLAGS.workdir, "--compare writes its report there (--workdir)")
            compare_runs(FLAGS.compare, FLAGS.workdir)
        else:
            from cvmae_jax.evaluation.run_eval import evaluate_run, run_config_with

            evaluate_run(FLAGS.workdir, split=FLAGS.split, step=FLAGS.step,
                         config=run_config_with(FLAGS.workdir, eval_overrides()))


PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


class _ThisPackageInfoOnly(std_logging.Filter):
    """Passes warnings and errors from everywhere, INFO lines only from cvmae_jax (Orbax and
    tfds log ~100 INFO lines per run), less tfds's warning that the dataset's config is not one
    of its registered ones (every prepared dataset's is: it names the settings' hash). A
    library's error keeps its line, not its traceback (Orbax logs one per thread of a failed
    save, ~80 lines each, before the ``error:`` line that says what failed)."""

    def filter(self, record: std_logging.LogRecord) -> bool:
        ours = os.path.abspath(record.pathname or "").startswith(PACKAGE_DIR)
        if record.levelno < std_logging.WARNING:
            return ours
        if not ours:
            record.exc_info = record.exc_text = None
        return not str(record.msg).startswith("Using custom data configuration")


def log_progress(level: int = logging.INFO) -> None:
    """Console lines at ``level`` and above, INFO ones of this package only (progress,
    metrics); ``-v=1`` shows every library's lines and the traceback behind an ``error:``
    line."""
    if logging.get_verbosity() < logging.DEBUG:
        logging.set_verbosity(level)
        filter_library_lines()


def filter_library_lines() -> None:
    """Console: INFO lines of this package only, and not tfds's custom-config warning."""
    logging.get_absl_handler().addFilter(_ThisPackageInfoOnly())


def eval_overrides() -> dict:
    """eval.py's ``--config.<field>=<value>`` overrides ({"eval.labels_dir": ...}). A config
    file given with ``--config=FILE`` is refused: eval.py evaluates the run as trained."""
    if FLAGS["config"].present:
        raise ValueError(f"--config={FLAGS['config'].config_filename}: eval.py reads the run's "
                         "config.json; change single fields with --config.<field>=<value> "
                         f"({eval_overridable()})")
    return config_flags.get_override_values(FLAGS["config"])


@contextlib.contextmanager
def user_errors(resumes: str = ""):
    """Bad settings or data end the program with one clear line and exit status 1, Ctrl-C
    with one line and 130 (``resumes``: what a rerun takes up, e.g. "train.py resumes from
    its last checkpoint"), SIGTERM before training with one line and 0, SIGTERM during an
    evaluation or cvmae-prepare's preparation with one line and 143. An error raised
    inside a library rather than by this package may be a bug: its line names the exception
    and the module, and -v=1 shows the traceback."""
    try:
        yield
    # OSError: unwritable paths too; FloatingPointError: a training step that is not finite
    except (ValueError, OSError, MEDSFormatError, FloatingPointError) as error:
        logging.debug("traceback of the error below", exc_info=True)  # shown with -v=1
        origin = _raised_in(error)
        sys.exit(f"error: {error}" + ("" if origin == __package__ else
                                      f" ({type(error).__name__} raised in {origin}; -v=1 "
                                      "shows the traceback)"))
    except Preempted as stop:  # before training started: nothing to save, as after a save
        print(stop, file=sys.stderr)
        sys.exit(0)
    except Terminated as stop:  # an evaluation or cvmae-prepare: nothing finished
        print(stop, file=sys.stderr)
        sys.exit(143)
    except KeyboardInterrupt:
        logging.debug("traceback of the interruption", exc_info=True)
        print("interrupted (Ctrl-C); rerun the same command" + (f" ({resumes})" if resumes
                                                                else ""), file=sys.stderr)
        sys.exit(130)


def _raised_in(error: BaseException) -> str:
    """The top-level package of the innermost Python frame that raised ``error`` (this
    package's name for its own files, also those run as ``python -m cvmae_jax.<module>``); for
    an error of a worker process that multiprocessing raised again here, the worker's frame."""
    if type(error.__cause__).__name__ == "RemoteTraceback":
        files = re.findall(r'File "([^"]+)"', str(error.__cause__))
        if files:
            return _package_of(files[-1], "?")
    tb = error.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    if tb is None:
        return "?"
    return _package_of(tb.tb_frame.f_code.co_filename,
                       tb.tb_frame.f_globals.get("__name__", "?").split(".")[0])


def _package_of(path: str, module: str) -> str:
    """This package's name when ``path`` is one of its files; else the package folder under
    site-packages, or ``module``."""
    path = os.path.abspath(path)
    if path.startswith(PACKAGE_DIR):
        return __package__
    parts = path.split(os.sep)
    if "site-packages" in parts[:-1]:
        return parts[parts.index("site-packages") + 1].removesuffix(".py")
    return module


def run(main) -> None:
    """``absl.app.run(main)``, where a ``--config.<field>`` that names no field of the config
    ends with one line naming it and the closest fields (ml_collections raises a bare
    AttributeError or KeyError with a traceback)."""
    app.run(main, flags_parser=_parse_flags)


def _parse_flags(argv: list[str]) -> list[str]:
    argv = argv[:1] + [expand_home(arg) for arg in argv[1:]]
    check_config_file(argv)
    with config_field_errors(argv):
        return app.parse_flags_with_usage(argv)


def expand_home(arg: str) -> str:
    """``--<name>=~/x`` with ``~`` expanded where the flag or config field is a folder or a
    file (``--workdir``, ``--output_dir``, ``--config.data.meds_dir``, ``--config``,
    ``--task``): the shell expands ``~`` only at the start of a word, so ``--workdir=~/runs``
    would name a folder called ``~`` in the current one."""
    name, equals, value = arg.partition("=")
    field = name.rsplit(".", 1)[-1]
    if (arg.startswith("--") and equals and value.startswith("~")
            and (field.endswith("dir") or name in ("--config", "--task"))):
        return f"{name}={os.path.expanduser(value)}"
    return arg


def check_config_file(argv: list[str]) -> None:
    """A ``--config=FILE`` that is missing, does not run, or has no ``get_config()`` ends with
    one line naming it (ml_collections raises with a traceback)."""
    path = _config_path_in(argv)
    if path is None:
        return
    if not os.path.isfile(path.split(":", 1)[0]):
        sys.exit(f"error: --config={path}: no such file (relative to {os.getcwd()}; the "
                 "configs are in the repository's configs/ folder, which the installed "
                 "package does not hold: give their path)")
    try:
        config_module.load_config_file(path)
    except SyntaxError as error:
        sys.exit(f"error: --config={path}: line {error.lineno}: {error.msg}")
    except Exception as error:  # noqa: BLE001 - any error of the user's file, in one line
        sys.exit(f"error: --config={path}: {type(error).__name__}: {error}")


@contextlib.contextmanager
def config_field_errors(argv: list[str]):
    """Turns ml_collections' error for an override of an unknown field into one line and exit
    status 1 (ml_collections checks overrides when the flag is parsed, and for a config flag
    with a default file already when it is defined)."""
    try:
        yield
    except (AttributeError, KeyError):
        unknown = unknown_config_fields(argv)
        if not unknown:
            raise
        sys.exit("error: " + "; ".join(unknown))


def unknown_config_fields(argv: list[str]) -> list[str]:
    """One message per ``--config.<field>=...`` of ``argv`` that names no field of the config
    file given with ``--config`` (default: cvmae_jax/config.py), with the closest field names."""
    fields = field_names(_config_file_named_in(argv))
    out = []
    for arg in argv[1:]:
        name = arg.split("=", 1)[0]
        if not name.startswith(("--config.", "--noconfig.")):
            continue
        field = name.split("config.", 1)[1]
        if field in fields:
            continue
        close = difflib.get_close_matches(field, sorted(fields), n=3, cutoff=0.75)
        section = field.rsplit(".", 1)[0] if "." in field else ""
        inside = [f[len(section) + 1:] for f in fields if section and
                  f.startswith(section + ".")]
        siblings = sorted({f.split(".", 1)[0] + (".*" if "." in f else "") for f in inside})
        out.append(f"--config.{field}: no such config field" + (
            "; did you mean " + " or ".join(f"--config.{c}" for c in close) + "?" if close
            else "") + (f" (config.{section} has: {', '.join(siblings)})" if siblings and
                        not close else ""))
    return out


def _config_path_in(argv: list[str]) -> str | None:
    """The ``--config=FILE`` (or ``--config FILE``) argument, None without one."""
    path = None
    for i, arg in enumerate(argv[1:], 1):
        if arg.startswith("--config="):
            path = arg.split("=", 1)[1]
        elif arg == "--config" and i + 1 < len(argv):
            path = argv[i + 1]
    return path


def _config_file_named_in(argv: list[str]) -> ml_collections.ConfigDict:
    """The config of the ``--config=FILE`` (or ``--config FILE``) argument, else the defaults."""
    path = _config_path_in(argv)
    if path and os.path.isfile(path.split(":", 1)[0]):
        try:
            return config_module.load_config_file(path)
        except Exception:  # noqa: BLE001 - the message then lists the default config's fields
            pass
    return config_module.default_config()


def train_main() -> None:
    """``python train.py --config=configs/demo.py --workdir=runs/demo``."""
    reuse_freed_memory()
    define_common_flags(config_required=True)
    run(_train)


def eval_main() -> None:
    """``python eval.py --workdir=runs/demo [--config.eval.labels_dir=...] [--split=held_out]``, or
    ``python eval.py --compare=RUN_A,RUN_B,... --workdir=OUT`` to compare evaluated runs."""
    reuse_freed_memory()
    with config_field_errors(sys.argv):  # the default config parses overrides when defined
        define_common_flags(config_required=False)
    flags.DEFINE_string("split", "held_out", "Split of the reconstruction metrics (the probes "
                        "always test on held_out); writes eval/ for held_out, eval_<split>/ "
                        "otherwise.")
    flags.DEFINE_integer("step", None, "Checkpoint step to evaluate (default: the newest); "
                         "writes eval_step<N>/ (eval_<split>_step<N>/), so eval/ keeps the "
                         "newest's results.", lower_bound=0)
    flags.DEFINE_list("compare", None, "Comma-separated evaluated run workdirs (a 'random' "
                      "masking run for each seed): compare them into --workdir instead of "
                      "evaluating --workdir.")
    run(_eval)
