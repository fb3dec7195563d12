"""Label files of a prediction task from an ACES task config (needs the ``[tasks]`` extra).

    python -m cvmae_jax.labels --config=configs/meds.py --config.data.meds_dir=MEDS \
        --task=in_icu_mortality_24h [--output_dir=DIR] [--overwrite]

``--task`` is a config shipped in configs/tasks/ (in_hospital_mortality_24h,
in_icu_mortality_24h, readmission_30d) or the path of a user's ACES config. Writes
``<meds_dir>/labels/<task>/{train,tuning,held_out}.parquet`` (or ``--output_dir``) in the MEDS
label schema, where eval.py finds them, and logs rows, subjects, positives and prevalence per
split. A task with no positive row in train is refused and nothing is written (docs/tasks.md);
a SIGTERM stops it in one line (exit status 143), writing nothing.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from absl import app, flags, logging
from ml_collections import config_flags

from cvmae_jax.cli import log_progress, run, user_errors
from cvmae_jax.data import meds
from cvmae_jax.jsonio import check_writable
from cvmae_jax.preemption import sigterm_terminates
from cvmae_jax.tasks import aces_extract, write_labels
from cvmae_jax.tasks.task_configs import task_config

FLAGS = flags.FLAGS


def make_labels(meds_dir: str, task: str, output_dir: str | None = None,
                overwrite: bool = False) -> dict[str, dict]:
    """Extracts ``task`` (a shipped task's name or an ACES config path) over meds_dir and
    writes its label files; returns {split: {rows, subjects, positives, prevalence}}."""
    name, config_path = task_config(task)
    out = output_dir or os.path.join(meds_dir, "labels", name)
    check_writable(out, "the task's label files are written there (--output_dir)")
    out = Path(out)
    write_labels.check_output(out, overwrite)
    subject_splits = meds.read_subject_splits(meds_dir)
    logging.info("labels %s: extracting %s over %s", name, config_path, meds_dir)
    labels = aces_extract.extract_labels(config_path, meds_dir)
    splits = write_labels.row_splits(labels, subject_splits, str(config_path))
    counts = write_labels.split_counts(labels, splits)
    for split, c in counts.items():
        logging.info("labels %s %s: %d rows, %d subjects, %d positive%s", name, split,
                     c["rows"], c["subjects"], c["positives"],
                     f" (prevalence {100 * c['prevalence']:.1f}%)" if c["rows"] else "")
        if c["rows"] and not c["positives"]:
            logging.warning("labels %s %s: no positive row; AUROC is undefined there", name,
                            split)
    write_labels.check_train_positives(name, counts)
    write_labels.write_task_folder(out, labels, splits, overwrite)
    logging.info("labels %s: wrote %s", name, out)
    return counts


def _main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    log_progress()
    with user_errors(), sigterm_terminates("while extracting the labels: nothing is written",
                                           python_handler=True):
        meds_dir = FLAGS.config.data.meds_dir
        if not meds_dir:
            raise ValueError("--config.data.meds_dir is required: the MEDS dataset to label")
        try:
            make_labels(meds_dir, FLAGS.task, FLAGS.output_dir, FLAGS.overwrite)
        except ImportError as error:  # no [tasks] extra: the install line, not a traceback
            sys.exit(f"error: {error}")


def main() -> None:
    config_flags.DEFINE_config_file(
        "config", None, "Path to a config file in configs/ (its data.meds_dir names the "
        "dataset; --config.data.meds_dir=<path> sets it).", lock_config=True)
    flags.mark_flags_as_required(["config"])
    flags.DEFINE_string("task", None, "A task config shipped in configs/tasks/ (by name) or the "
                        "path of an ACES task config (.yaml).", required=True)
    flags.DEFINE_string("output_dir", None, "Folder for the task's label files (default: "
                        "<meds_dir>/labels/<task>).")
    flags.DEFINE_bool("overwrite", False, "Replace the task's existing label files.")
    run(_main)


if __name__ == "__main__":
    main()
