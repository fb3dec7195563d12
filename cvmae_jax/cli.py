"""Command-line entry points (absl flags + ml_collections config files)."""

from __future__ import annotations

import contextlib
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from cvmae_jax.data.meds import MEDSFormatError
from cvmae_jax.host_memory import reuse_freed_memory

FLAGS = flags.FLAGS


def define_common_flags(config_required: bool) -> None:
    config_flags.DEFINE_config_file(
        "config", None, "Path to a config file in configs/ (fields can be overridden with "
        "--config.<field>=<value>).", lock_config=True)
    if config_required:
        flags.mark_flags_as_required(["config"])
    flags.DEFINE_string("workdir", None, "Run directory (outputs, checkpoints).", required=True)


def _train(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from cvmae_jax.train import train_and_evaluate

    logging.set_verbosity(logging.INFO)
    with user_errors():
        train_and_evaluate(FLAGS.config, FLAGS.workdir)


def _eval(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.INFO)
    with user_errors():
        if FLAGS.compare:
            from cvmae_jax.evaluation.compare import compare_runs

            compare_runs(FLAGS.compare, FLAGS.workdir)
        else:
            from cvmae_jax.evaluation.run_eval import evaluate_run

            evaluate_run(FLAGS.workdir, config=FLAGS.config, split=FLAGS.split)


@contextlib.contextmanager
def user_errors():
    """Bad settings or data end the program with one clear line and exit status 1."""
    try:
        yield
    except (ValueError, FileNotFoundError, MEDSFormatError) as error:
        logging.debug("traceback of the error below", exc_info=True)  # shown with -v=1
        sys.exit(f"error: {error}")


def train_main() -> None:
    """``python train.py --config=configs/demo.py --workdir=runs/demo``."""
    reuse_freed_memory()
    define_common_flags(config_required=True)
    app.run(_train)


def eval_main() -> None:
    """``python eval.py --workdir=runs/demo [--config=...] [--split=held_out]``, or
    ``python eval.py --compare=RUN_A,RUN_B,... --workdir=OUT`` to compare evaluated runs."""
    reuse_freed_memory()
    define_common_flags(config_required=False)
    flags.DEFINE_string("split", "held_out", "Split to evaluate.")
    flags.DEFINE_list("compare", None, "Comma-separated evaluated run workdirs (one with "
                      "masking strategy 'random'): compare them into --workdir instead of "
                      "evaluating --workdir.")
    app.run(_eval)
