"""The three commands of the MEDS-DEV model entry (``meds_dev/cvmae/model.yaml``).

    python -m cvmae_jax.meds_dev pretrain --config=meds_dev/cvmae/config.py \
        --dataset_dir=MEDS --output_dir=PRETRAIN
    python -m cvmae_jax.meds_dev probe --dataset_dir=MEDS --labels_dir=LABELS \
        --model_initialization_dir=PRETRAIN --output_dir=PROBE
    python -m cvmae_jax.meds_dev predict --model_initialization_dir=PROBE --split=held_out \
        --output_dir=PREDICT

- ``pretrain`` (MEDS-DEV's unsupervised train): CV-Masking pretraining on the dataset; the
  output folder is a training workdir (train.py's).
- ``probe`` (supervised train): the frozen encoder's linear probe on the task's labels, as
  eval.py fits it (C chosen on tuning; eval.py's single-code reconstruction and fine-tuning
  skipped): ``PROBE/run`` is an evaluation workdir whose checkpoints link to the pretraining
  run's and whose ``eval/`` holds eval.py's outputs, the task's labels linked in as
  ``PROBE/labels/task``.
- ``predict`` (supervised predict): ``PREDICT/predictions.parquet``, the probe's predictions of
  the split in MEDS-DEV's schema (eval.py exports tuning and held_out; label rows without any
  lab event before prediction_time have no prediction, see docs/evaluation.md).
"""

from __future__ import annotations

import os
import shutil

from absl import app, flags, logging
from ml_collections import config_flags

from cvmae_jax.cli import log_progress, run, user_errors
from cvmae_jax.evaluation.exports import PREDICTION_SPLITS
from cvmae_jax.host_memory import reuse_freed_memory
from cvmae_jax.workdir import CONFIG_FILE, DATA_STATS_FILE, checkpoint_dir, eval_dir, read_config

FLAGS = flags.FLAGS
TASK = "task"  # the name of the task folder the probe reads (MEDS-DEV gives one task's labels)
STAGES = ("pretrain", "probe", "predict")


def pretrain(config, dataset_dir: str, output_dir: str) -> dict:
    """CV-Masking pretraining of ``config`` on dataset_dir into the workdir output_dir."""
    from cvmae_jax.jsonio import check_writable
    from cvmae_jax.train import train_and_evaluate

    config.data.meds_dir = dataset_dir
    config.data.allow_synthetic = False
    check_writable(output_dir, "the pretraining run is written there (--output_dir)")
    return train_and_evaluate(config, output_dir)


def probe(dataset_dir: str, labels_dir: str, pretrain_dir: str, output_dir: str) -> dict:
    """Fits and evaluates the task's probe on the pretrained run; returns eval.py's metrics."""
    from cvmae_jax.evaluation.run_eval import evaluate_run, run_config_with

    if not os.path.isdir(labels_dir):
        raise FileNotFoundError(f"--labels_dir={labels_dir}: no such folder")
    pretrained = read_config(pretrain_dir)
    run_dir = os.path.join(output_dir, "run")
    os.makedirs(run_dir, exist_ok=True)
    for name in (CONFIG_FILE, DATA_STATS_FILE):
        shutil.copyfile(os.path.join(pretrain_dir, name), os.path.join(run_dir, name))
    _link(os.path.abspath(checkpoint_dir(pretrain_dir)), checkpoint_dir(run_dir))
    _link(os.path.abspath(labels_dir), os.path.join(output_dir, "labels", TASK))
    overrides = {"data.meds_dir": dataset_dir,
                 "data.data_dir": os.path.abspath(pretrained.data.data_dir or os.path.join(
                     pretrain_dir, "data")),
                 "eval.labels_dir": os.path.join(output_dir, "labels"),
                 # neither is the probe's: one pass per lab code; two more trainings per task
                 "eval.single_code": False, "eval.finetune.enabled": False}
    return evaluate_run(run_dir, config=run_config_with(run_dir, overrides))


def predict(probe_dir: str, split: str, output_dir: str) -> str:
    """Copies the probe's predictions of ``split`` to ``output_dir/predictions.parquet``."""
    if split not in PREDICTION_SPLITS:
        raise ValueError(f"--split={split}: the probe's predictions cover "
                         f"{' and '.join(PREDICTION_SPLITS)} (train is what it was fit on)")
    source = os.path.join(eval_dir(os.path.join(probe_dir, "run")), "predictions", TASK,
                          f"{split}.parquet")
    if not os.path.isfile(source):
        raise FileNotFoundError(f"{source}: no predictions; run the probe (MEDS-DEV's "
                                "supervised train) into --model_initialization_dir first")
    os.makedirs(output_dir, exist_ok=True)
    target = os.path.join(output_dir, "predictions.parquet")
    shutil.copyfile(source, target)
    return target


def _link(target: str, path: str) -> None:
    """A symbolic link path -> target (replacing an earlier link of the same name)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if os.path.islink(path):
        os.unlink(path)
    os.symlink(target, path)


def _main(argv) -> None:
    if len(argv) != 2 or argv[1] not in STAGES:
        raise app.UsageError(f"give one stage: {', '.join(STAGES)} (got {argv[1:]})")
    log_progress()
    stage, f = argv[1], FLAGS
    with user_errors(resumes="pretrain resumes from its last checkpoint"
                     if stage == "pretrain" else ""):
        if stage == "pretrain":
            if f.config is None:
                raise ValueError("pretrain needs --config (meds_dev/cvmae/config.py)")
            pretrain(f.config, f.dataset_dir, f.output_dir)
        elif stage == "probe":
            probe(f.dataset_dir, f.labels_dir, f.model_initialization_dir, f.output_dir)
        else:
            logging.info("wrote %s", predict(f.model_initialization_dir, f.split, f.output_dir))


def main() -> None:
    reuse_freed_memory()  # as train.py and eval.py: the stages train or evaluate in-process
    config_flags.DEFINE_config_file("config", None, "pretrain: the entry's config file "
                                    "(meds_dev/cvmae/config.py[:demo]).", lock_config=False)
    flags.DEFINE_string("dataset_dir", None, "The MEDS dataset (MEDS-DEV's {dataset_dir}).")
    flags.DEFINE_string("labels_dir", None, "probe: the task's label files ({labels_dir}).")
    flags.DEFINE_string("model_initialization_dir", None, "probe: the pretraining's output "
                        "folder; predict: the probe's ({model_initialization_dir}).")
    flags.DEFINE_string("split", "held_out", "predict: the split to predict ({split}).")
    flags.DEFINE_string("output_dir", None, "This stage's output folder ({output_dir}).",
                        required=True)
    run(_main)


if __name__ == "__main__":
    main()
