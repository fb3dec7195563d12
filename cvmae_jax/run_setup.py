"""What a run needs before its first step: checked settings, the prepared data, the masking
probabilities, and the metadata that checkpoints carry (to refuse an incompatible resume)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from cvmae_jax import parallel
from cvmae_jax.attention import check_attention
from cvmae_jax.checkpoint import Checkpointer, array_shapes
from cvmae_jax.data.prepare import PreparedDataset, dataset_id, prepare_dataset
from cvmae_jax.data.synthetic import synthetic_meds_root
from cvmae_jax.config import set_field
from cvmae_jax.config_checks import config_warnings, padding_warnings
from cvmae_jax.mask_probabilities import (TIER_STATISTICS, expected_mask_rate,
                                          percentile_threshold, strategy_probs)
from cvmae_jax.workdir import (CONFIG_FILE, DATA_STATS_FILE, checkpoint_dir, read_data_stats,
                               with_eval_defaults)

# Fields the processes of one run may set each to its own value: their ids and devices, and
# paths and host resources (each host's mount of the same files, its own compile cache)
PER_PROCESS_FIELDS = ("parallel.process_id", "parallel.local_device_ids", "data.meds_dir",
                      "data.data_dir", "data.workers", "train.compilation_cache_dir")
SHARED_WORKDIR_WAIT_S = 30.0  # check_processes_share: longest wait for process 0's file
# Fields that may change between a run and its resumption without changing its results.
RESUMABLE_CHANGES = ("data.meds_dir", "data.data_dir", "data.workers", "parallel.",
                     "train.log_every", "train.compilation_cache_dir",
                     "train.eval_every", "train.checkpoint_every", "train.keep_checkpoints",
                     "train.transfer_guard", "train.allow_config_change", "eval.",
                     "model.attention")  # the same function computed another way


def validate_config(config, num_devices: int) -> None:
    """Refuses settings that would fail later, before anything is read or written, and logs
    a warning for each setting that runs but is likely not what was meant (``check_config``
    runs before the devices start: ``train.set_up``)."""
    if not (config.data.meds_dir or config.data.allow_synthetic):
        raise ValueError("config.data.meds_dir is required with this config "
                         "(pass --config.data.meds_dir=/path/to/MEDS; configs/demo.py runs on "
                         "the embedded synthetic data)")
    check_attention(config.model.attention, config.model.dtype,
                    jax.default_backend())
    parallel.check_batch_size(config.train.batch_size, num_devices, "config.train.batch_size")
    parallel.check_batch_size(config.eval.batch_size, num_devices, "config.eval.batch_size")
    if config.eval.finetune.enabled:  # eval.py on the same devices
        parallel.check_batch_size(config.eval.finetune.batch_size, num_devices,
                                  "config.eval.finetune.batch_size")
    if jax.process_index() == 0:
        for warning in config_warnings(config):
            logging.warning("%s", warning)


def enable_compilation_cache(cache_dir: str | None) -> None:
    """Stores compiled steps (those taking >= 1 s to compile) under ``cache_dir`` and reuses
    them on the next run or restart with the same program and devices. JAX reads the setting
    at its first compile in a process; later calls with another folder keep the first one."""
    if cache_dir:
        jax.config.update("jax_compilation_cache_dir", os.path.expanduser(cache_dir))


def data_dir(config, workdir: str) -> str:
    return config.data.data_dir or os.path.join(workdir, "data")


def resolve_meds_dir(config, workdir: str) -> str:
    """``config.data.meds_dir``, or the synthetic default of ``config.data.synthetic_*``
    generated once under the data dir."""
    if config.data.meds_dir:
        return config.data.meds_dir
    return synthetic_meds_root(data_dir(config, workdir), config.data.synthetic_subjects,
                               config.data.synthetic_seed, log=logging.info)


def prepare_run_data(config, workdir: str) -> PreparedDataset:
    """The prepared dataset; with several processes, process 0 builds it while the others wait,
    then they reuse it. When a process fails (bad MEDS input on process 0, an unreadable
    dataset on another), every process raises at once instead of waiting in the next
    collective until JAX's shutdown timeout."""
    def prepare():
        dataset = prepare_dataset(config.data, resolve_meds_dir(config, workdir),
                                  data_dir(config, workdir), log=logging.info)
        if jax.process_index() == 0:
            logging.info("data: %d train windows; codes, counts and warnings in %s",
                         dataset.num_examples["train"], dataset.report_path)
            for warning in padding_warnings(config.data, dataset.num_tokens["train"],
                                            dataset.num_examples["train"]):
                logging.warning("%s", warning)
        return dataset

    if jax.process_count() == 1:
        return prepare()
    if jax.process_index() != 0:
        logging.info("process %d: waiting for process 0 to prepare the dataset",
                     jax.process_index())
    built = parallel.on_process_0(prepare, "process 0 could not prepare the dataset; its error "
                                           "is in its log")
    return parallel.on_every_process(
        lambda: built if jax.process_index() == 0 else prepare(),
        "process(es) {processes} could not read the prepared dataset; their errors are in their "
        "logs")


def schedule_words(config, dataset: PreparedDataset) -> str:
    """How many passes over the train windows ``config.train``'s schedule makes."""
    steps, batch = config.train.num_steps, config.train.batch_size
    windows = dataset.num_examples["train"]
    return (f"{steps:,} steps of {batch} windows, {steps * batch / max(windows, 1):,.1f} "
            f"passes over the {windows:,} train windows")


def check_processes_share(workdir: str, start_step: int, config,
                          wait_s: float = SHARED_WORKDIR_WAIT_S) -> None:
    """With several processes: every process runs the same settings (``settings_digests``),
    sees the same ``workdir`` (a file process 0 writes there) and resumes from the same
    checkpoint step; else every process raises with the processes that differ (instead of
    hanging at the first checkpoint or failing in a collective). Waits up to ``wait_s`` for the
    file, for network file systems that cache directory listings."""
    if jax.process_count() == 1:
        return
    token, error = 0, None
    if jax.process_index() == 0:
        token = int(np.random.default_rng().integers(1, 2**31 - 1))
        try:
            open(_marker(workdir, token), "w").close()
        except OSError as raised:  # re-raised after the broadcast, which every process joins
            error = raised
    token = int(multihost_utils.broadcast_one_to_all(np.int32(0 if error else token)))
    if not token:  # process 0 could not write its file
        if error is not None:
            raise error
        raise ValueError(f"{workdir}: process 0 could not write there; its error is in its log")
    marker = _marker(workdir, token)
    deadline = time.monotonic() + wait_s
    while not (sees := os.path.exists(marker)) and time.monotonic() < deadline:
        os.listdir(workdir)  # a directory read refreshes cached listings on NFS
        time.sleep(0.5)
    sections, digests = settings_digests(config)
    seen = multihost_utils.process_allgather(np.array([sees, start_step, *digests], np.int64))
    if jax.process_index() == 0:
        with contextlib.suppress(OSError):
            os.remove(marker)
    differ = [name for name, column in zip(sections, seen[:, 2:].T) if len(set(column)) > 1]
    if differ:
        others = [i for i, row in enumerate(seen) if list(row[2:]) != list(seen[0, 2:])]
        raise ValueError(f"process(es) {others} run other settings than process 0 in "
                         f"config.{', config.'.join(differ)}; launch every process with the "
                         "same config file and --config flags")
    blind = [i for i, (ok, *_) in enumerate(seen) if not ok]
    if blind:
        raise ValueError(f"{workdir}: process(es) {blind} do not see the files process 0 writes "
                         "there; every process needs the same workdir on a shared file system "
                         "(NFS, Filestore, a GCS-FUSE mount), not a local disk")
    if len({int(step) for _, step, *_ in seen}) > 1:
        raise ValueError(f"{workdir}: the processes see different latest checkpoints "
                         f"({sorted({int(step) for _, step, *_ in seen})}); is a save still being "
                         "copied? Rerun when every process sees the same checkpoints")


def settings_digests(config) -> tuple[list[str], list[int]]:
    """The config's top-level sections and one 31-bit digest of each (its JSON), less the
    fields that may differ between the processes of one run (``PER_PROCESS_FIELDS``)."""
    settings = config.to_dict()
    for name in PER_PROCESS_FIELDS:
        section, field = name.split(".")
        settings.get(section, {}).pop(field, None)
    sections = sorted(settings)
    digests = [int.from_bytes(hashlib.sha256(json.dumps(
        settings[name], sort_keys=True, default=str).encode()).digest()[:4], "big") >> 1
        for name in sections]
    return sections, digests


def _marker(workdir: str, token: int) -> str:
    return os.path.join(workdir, f".shared_by_processes_{token}")


def remove_new_workdir(path: str) -> None:
    """Removes a workdir this command created, with what set-up wrote in it before failing
    (the synthetic MEDS data, an empty checkpoint folder). With several processes each
    removes only the folders that hold no file, deepest first: another process may still be
    releasing its lock file or checkpointer there."""
    if jax.process_count() == 1:
        shutil.rmtree(path, ignore_errors=True)
        return
    for folder, _, _ in sorted(os.walk(path), key=lambda entry: -len(entry[0])):
        with contextlib.suppress(OSError):
            os.rmdir(folder)  # fails unless empty


def mask_probabilities(config, dataset: PreparedDataset) -> np.ndarray:
    """Per-code mask probabilities [V] of ``config.masking.strategy`` from train statistics."""
    stats, masking = dataset.stats, config.masking
    return strategy_probs(masking.strategy, cv=stats.cv, variance=stats.variance,
                          within_subject_cv=stats.within_subject_cv, token_counts=stats.count,
                          threshold_percentile=masking.threshold_percentile,
                          p_high=masking.p_high, p_low=masking.p_low)


def stats_record(config, dataset: PreparedDataset, probs: np.ndarray) -> dict:
    """The content of ``data_stats.json``: per-code statistics with mask probabilities."""
    record = dataset.stats.to_dict(extra={"mask_prob": probs,
                                          "description": dataset.descriptions})
    masking = config.masking
    statistic = TIER_STATISTICS.get(masking.strategy)  # None: no tiers (random, cv_rank)
    record["masking"] = dict(
        masking.to_dict(),
        cv_threshold=percentile_threshold(dataset.stats.cv, masking.threshold_percentile),
        tier_statistic=statistic,
        tier_threshold=None if statistic is None else percentile_threshold(
            getattr(dataset.stats, statistic), masking.threshold_percentile),
        expected_mask_rate=expected_mask_rate(probs, dataset.stats.count))
    record["dataset"] = dataset.settings_id
    return record


def check_resume_settings(saved_run_info: dict, config, step: int) -> None:
    """Before any data is prepared: refuses to resume with another number of processes (the
    input pipeline's position is stored per process) or, unless
    ``train.allow_config_change``, with settings that would silently change the run."""
    saved_processes = saved_run_info["processes"]
    if saved_processes != jax.process_count():
        raise ValueError(f"the checkpoint at step {step} was written by {saved_processes} "
                         f"process(es) and this run has {jax.process_count()}; the input "
                         f"pipeline's position is stored per process, so launch "
                         f"{saved_processes} process(es) as the run that wrote it did (any "
                         "number of devices per process)")
    changes = changed_settings(saved_run_info["config"], config)
    if not config.train.allow_config_change:
        _refuse_changes(step, changes)
    elif changes:
        logging.warning("resuming the checkpoint at step %d with other settings "
                        "(train.allow_config_change): %s", step, "; ".join(changes))


def check_resume_dataset(saved_run_info: dict, config, workdir: str, step: int) -> None:
    """Refuses to resume on another prepared dataset (the MEDS files changed) unless
    ``train.allow_config_change``; before the dataset is prepared (its name follows from the
    settings and the MEDS files: ``dataset_id``)."""
    saved = saved_run_info["data_stats"].get("dataset")
    current = dataset_id(config.data, resolve_meds_dir(config, workdir))
    if saved == current:
        return
    change = f"prepared dataset: {saved} -> {current}"
    if not config.train.allow_config_change:
        _refuse_changes(step, [change])
    logging.warning("resuming the checkpoint at step %d on other data "
                    "(train.allow_config_change): %s", step, change)


def _remove_if_built(dataset: PreparedDataset) -> None:
    """Removes ``dataset`` when its preparation built it (``dataset.built``; process 0), and
    its settings folder if nothing else is in it (another job's preparation of the same
    settings may be): one reused, or finished first by another job, stays."""
    if dataset.built and jax.process_index() == 0:
        shutil.rmtree(dataset.path, ignore_errors=True)  # <builder>/<settings id>/<version>
        with contextlib.suppress(OSError):
            os.rmdir(Path(dataset.path).parent)  # only while empty


def check_resume_codes(saved_run_info: dict, dataset: PreparedDataset, step: int) -> None:
    """Refuses to resume on data whose lab code list differs from the checkpoint's, even with
    ``train.allow_config_change``: the trained code embeddings follow that list, so they would
    stand for other labs. A dataset built for this resume is removed again."""
    trained = [row["code"] for row in saved_run_info["data_stats"]["codes"]]
    current = list(dataset.stats.codes)
    problem = code_list_difference(trained, current)
    if problem:
        _remove_if_built(dataset)
        raise ValueError(f"the checkpoint at step {step} was trained on {len(trained)} lab "
                         f"codes; the data prepared now ({dataset.path}) has {len(current)}, "
                         f"{problem}. The model's code embeddings follow the training list, so "
                         "resume only on data with the same codes (or use a new workdir)")


def prepare_eval_dataset(config, workdir: str, meds_dir: str) -> PreparedDataset:
    """The dataset eval.py reads, checked against the run's (``check_eval_dataset``); a dataset
    this call built is removed again when the check refuses it, so a wrong
    ``--config.data.meds_dir`` leaves the run as it was."""
    dataset = prepare_dataset(config.data, meds_dir, data_dir(config, workdir), log=logging.info)
    try:
        check_eval_dataset(workdir, dataset)
    except ValueError:
        _remove_if_built(dataset)
        raise
    return dataset


def code_list_difference(trained: list[str], current: list[str]) -> str | None:
    """How the lab code list ``current`` differs from ``trained`` (codes missing or added, or
    the same codes in another order), or None when the lists are equal."""
    if trained == current:
        return None
    trained_codes, current_codes = set(trained), set(current)
    missing = [c for c in trained if c not in current_codes]
    added = [c for c in current if c not in trained_codes]
    if missing or added:
        return ", ".join([f"{len(missing)} of them missing (first: {missing[:3]})"] * bool(missing)
                         + [f"{len(added)} others added (first: {added[:3]})"] * bool(added))
    moved = sum(a != b for a, b in zip(trained, current))
    return (f"the same codes in another order ({moved} positions differ: the frequency ranking "
            "changed)")


def check_eval_dataset(workdir: str, dataset: PreparedDataset) -> None:
    """Refuses to evaluate a run on data whose lab codes differ from those it was trained on
    (``data_stats.json``; the model's code embeddings follow that list's order, most frequent
    first), and logs a warning when the codes match but the MEDS files changed."""
    path = os.path.join(workdir, DATA_STATS_FILE)
    trained_stats = read_data_stats(workdir)
    trained = [row["code"] for row in trained_stats["codes"]]
    current = list(dataset.stats.codes)
    problem = code_list_difference(trained, current)
    if problem:
        raise ValueError(f"{path}: the run was trained on {len(trained)} lab codes; the data "
                         f"prepared for evaluation ({dataset.path}) has {len(current)}, "
                         f"{problem}. The model's code embeddings follow the training list, so "
                         "evaluate on the data it was trained on (check config.data.meds_dir)")
    if trained_stats.get("dataset") != dataset.settings_id:
        logging.warning("eval: the data was prepared again as %s (trained on %s: the MEDS "
                        "files differ in size or content); the same %d lab codes, "
                        "normalized and reported with the new train split's statistics "
                        "(mask probabilities included)", dataset.settings_id,
                        trained_stats.get("dataset"), len(current))


def _refuse_changes(step: int, changes: list[str]) -> None:
    if changes:
        raise ValueError(f"the checkpoint at step {step} was written with other settings ("
                         + "; ".join(changes) + "). Use a new workdir, or pass "
                         "--config.train.allow_config_change=True to resume anyway")


def restore_for_resume(checkpointer, step: int, abstract_state, data_iterator, config):
    """The state of checkpoint ``step`` (and the input pipeline moved to its position). With
    ``train.allow_config_change``, a checkpoint whose arrays have other shapes than
    ``abstract_state``'s is refused first, in one line naming one of them, from the
    checkpoint's metadata (a failed restore would print Orbax's tree and stray tracebacks)."""
    if config.train.allow_config_change:
        check_shapes_fit(Checkpointer.saved_shapes(checkpointer.directory, step),
                         array_shapes(abstract_state), step)
    return checkpointer.restore(step, abstract_state, data_iterator)


def check_shapes_fit(saved: dict[str, tuple], wanted: dict[str, tuple], step: int) -> None:
    """Raises ValueError naming the first array (``array_shapes`` paths, parameters first)
    whose shape differs, or that only one of the checkpoint and this model has."""
    differing = sorted((not path.startswith("params"), path)
                       for path in set(saved) | set(wanted)
                       if saved.get(path) != wanted.get(path))
    if not differing:
        return
    path = differing[0][1]
    where = ("is not in this model" if path not in wanted else "is not in the checkpoint"
             if path not in saved else
             f"has shape {list(saved[path])} there and {list(wanted[path])} here")
    raise ValueError(f"the checkpoint at step {step} does not fit this config's model: {path} "
                     f"{where} ({len(differing)} arrays differ); "
                     "config.train.allow_config_change resumes only changes that keep every "
                     "parameter's shape: use a new workdir")


def evaluated_config(config, workdir: str, step: int) -> ml_collections.ConfigDict:
    """The settings eval.py evaluates checkpoint ``step`` with: those it was saved with (read
    with its run item, which checks the checkpoint for damage) and ``config``'s
    RESUMABLE_CHANGES fields (``eval.*``, paths, ...). Where ``config`` (the run's
    ``config.json``) differs in other fields, a warning names them: a resume with
    ``train.allow_config_change`` stopped before its next save, or a ``config.json`` copied
    from another run or edited. The model is built from these settings, the arrays come from
    the checkpoint."""
    saved = with_eval_defaults(
        Checkpointer.read_run_info(checkpoint_dir(workdir), step)["config"]).to_dict()
    changes = changed_settings(saved, config)
    if changes:
        more = f"; {len(changes) - 3} more" if len(changes) > 3 else ""
        logging.warning("eval: %s differs from the settings the checkpoint at step %d was "
                        "saved with (checkpoint -> %s: %s%s); evaluating the checkpoint with "
                        "its own", CONFIG_FILE, step, CONFIG_FILE, "; ".join(changes[:3]), more)
    for name, _, value in _changed_fields(saved, config.to_dict()):
        if name.startswith(RESUMABLE_CHANGES):
            set_field(saved, name, value)
    return ml_collections.ConfigDict(saved)


def changed_settings(saved_config: dict, config) -> list[str]:
    """``"field: old -> new"`` for every setting of ``config`` that differs from a run's saved
    ``config.json`` and would change its results (RESUMABLE_CHANGES excepted)."""
    return [f"{name}: {old!r} -> {new!r}" for name, old, new in
            _changed_fields(saved_config, config.to_dict())
            if not name.startswith(RESUMABLE_CHANGES)]


def _changed_fields(old: dict, new: dict, prefix: str = ""):
    """(dotted name, old value, new value) for every leaf that differs."""
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        name = f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            yield from _changed_fields(a, b, name + ".")
        elif _normalized(a) != _normalized(b):
            yield name, a, b


def _normalized(value):
    """JSON round trips turn tuples into lists; compare them as equal."""
    return list(value) if isinstance(value, tuple) else value
