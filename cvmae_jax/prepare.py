"""``python -m cvmae_jax.prepare --config=configs/meds.py --config.data.meds_dir=MEDS
--config.data.data_dir=OUT``: prepare a MEDS root on the CPU, before (and apart from) training,
in `config.data.prepare_workers` processes, or as Apache Beam pipelines with
``--beam_options="--runner=..."`` (the ``[beam]`` extra; docs/data.md).

Prints a summary and the path of the dataset that training reuses (same config, same data_dir).
Bad input exits with status 1 and one line ``error: ...``, SIGTERM with 143 and one line;
nothing is written then.
"""

from __future__ import annotations

from absl import app, flags, logging
from ml_collections import config_flags

from cvmae_jax.cli import log_progress, run, user_errors
from cvmae_jax.data.shard_pool import ShardPool
from cvmae_jax.preemption import sigterm_terminates

FLAGS = flags.FLAGS


def _prepare(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    data = FLAGS.config.data
    with user_errors():
        if not data.meds_dir:
            raise ValueError("config.data.meds_dir is required (prepare never generates "
                             "synthetic data): pass --config.data.meds_dir=/path/to/MEDS")
        if not data.data_dir:
            raise ValueError("config.data.data_dir is required: pass "
                             "--config.data.data_dir=/path/to/prepared (the same as for training)")
        # started before the imports below, so the other processes start beside them
        pool = _beam_pool(data.data_dir) or ShardPool(data.prepare_workers)
    with pool:
        from cvmae_jax.config_checks import check_data_config, padding_warnings
        from cvmae_jax.data.prepare import prepare_dataset
        from cvmae_jax.data.report import selection_counts, selection_summary

        log_progress(logging.WARNING)  # the summary below is printed
        with user_errors(), sigterm_terminates("while preparing: nothing half-built is left",
                                               python_handler=True):
            check_data_config(data)
            prepared = prepare_dataset(data, None, data.data_dir, pool=pool)
    report = prepared.report
    print(f"\nPrepared dataset: {prepared.path}")
    print(f"  codes: {selection_summary(report)} ({selection_counts(report)})")
    for split in prepared.num_examples:
        s = report["splits"][split]
        listed = "" if s["subjects_with_rows"] == s["subjects"] else \
            f" (of {s['subjects']:,} in the split list)"
        print(f"  {split}: {s['subjects_with_rows']:,} subjects{listed}, {s['events']:,} events, "
              f"{s['lab']['lab_events']:,} selected events -> {prepared.num_examples[split]:,} "
              f"windows, {prepared.num_tokens[split]:,} tokens")
    for w in report.get("warnings", []) + padding_warnings(
            data, prepared.num_tokens["train"], prepared.num_examples["train"]):
        print(f"  WARNING: {w}")
    print(f"  report: {prepared.report_path}")
    print(f"  read it: tfds.data_source({prepared.builder_name!r}, "
          f"data_dir={prepared.data_dir!r}, split='train')")


def _beam_pool(data_dir: str):
    """The BeamPool of --beam_options; None without them."""
    if not FLAGS.beam_options:
        return None
    try:
        from cvmae_jax.data.beam_pool import BeamPool
    except ImportError as error:
        raise ValueError(f"--beam_options needs Apache Beam ({error}): pip install -e "
                         "'.[beam]'") from None
    return BeamPool(FLAGS.beam_options, f"{data_dir}/downloads/beam")


def main() -> None:
    config_flags.DEFINE_config_file(
        "config", None, "Path to a config file in configs/ (fields can be overridden with "
        "--config.<field>=<value>).", lock_config=True)
    flags.DEFINE_string(
        "beam_options", "", "Prepare as Apache Beam pipelines with these pipeline options, e.g. "
        "'--runner=DirectRunner --direct_num_workers=4 --direct_running_mode=multi_processing' "
        "(needs the [beam] extra; empty: config.data.prepare_workers local processes).")
    flags.mark_flags_as_required(["config"])
    run(_prepare)


if __name__ == "__main__":
    main()
