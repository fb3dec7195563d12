"""``python -m cvmae_jax.study --config=configs/study.py --workdir=STUDY``: train and evaluate
every (strategy, seed) of ``config.study`` on one prepared dataset, then compare them.

Runs live in ``STUDY/runs/<strategy>_s<seed>`` and share ``config.data.data_dir`` (default
``STUDY/data``). Rerunning the command resumes: a run whose ``eval/metrics.json`` is at the
final step is skipped, a half-trained run resumes from its checkpoint. The comparison
(``compare_runs``) writes ``STUDY/summary.json``, ``STUDY/report.md`` and the PNGs.
"""

from __future__ import annotations

import os
import time

import ml_collections
from absl import app, logging

from cvmae_jax import cli
from cvmae_jax.checkpoint import Checkpointer
from cvmae_jax.config import eval_settings
from cvmae_jax.config_checks import check_known_fields, is_seed
from cvmae_jax.host_memory import reuse_freed_memory
from cvmae_jax.jsonio import check_writable
from cvmae_jax.mask_probabilities import STRATEGIES
from cvmae_jax.metrics import clock
from cvmae_jax.run_setup import changed_settings
from cvmae_jax.workdir import checkpoint_dir, eval_metrics_path, read_config, read_eval_metrics

FLAGS = cli.FLAGS


def run_configs(config, workdir: str) -> list[tuple[str, ml_collections.ConfigDict]]:
    """(run dir, training config) per (seed, strategy), seed-major so that every finished
    seed is a complete comparison. The training configs carry no ``study`` field."""
    check_known_fields(config)  # the study's own fields too: its run configs lack them
    study = config.study
    if isinstance(study.seeds, str) or not all(is_seed(s) for s in study.seeds):
        raise ValueError(f"config.study.seeds={study.seeds!r}: expected integers in [0, 2**32), "
                         "e.g. --config.study.seeds='(0, 1, 2)'")
    strategies, seeds = list(study.strategies), list(study.seeds)
    unknown = [s for s in strategies if s not in STRATEGIES]
    if unknown or "random" not in strategies or len(set(strategies)) != len(strategies):
        raise ValueError(f"config.study.strategies={tuple(strategies)}: expected distinct "
                         f"strategies from {STRATEGIES}, including 'random' (the reference)")
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"config.study.seeds={tuple(seeds)}: expected distinct seeds")
    base = ml_collections.ConfigDict(config.to_dict())
    del base["study"]
    base.data.data_dir = config.data.data_dir or os.path.join(workdir, "data")
    out = []
    for seed in seeds:
        for strategy in strategies:
            run = ml_collections.ConfigDict(base.to_dict())
            run.seed, run.masking.strategy = seed, strategy
            # the scratch model depends on the seed only: trained once, on the random run
            run.eval.finetune.scratch = bool(base.eval.finetune.scratch) and strategy == "random"
            out.append((os.path.join(workdir, "runs", f"{strategy}_s{seed}"), run))
    return out


def is_finished(run_dir: str, config) -> bool:
    """True when ``eval/metrics.json`` evaluates the final training step with the study's
    ``eval.*`` settings (those the metrics record); refuses a finished run trained with other
    settings (as a resume would). A run evaluated with other eval settings, or whose
    evaluation was interrupted (its config.json already holds the new ones), is evaluated
    again (not retrained)."""
    if not os.path.exists(eval_metrics_path(run_dir)):
        return False
    metrics = read_eval_metrics(run_dir)
    if metrics.get("step") != config.train.num_steps:
        return False
    changes = changed_settings(read_config(run_dir).to_dict(), config)
    if changes:
        raise ValueError(f"{run_dir} was trained with other settings ({'; '.join(changes)}); "
                         f"use a new --workdir")
    if metrics.get("eval_settings") != eval_settings(config):
        logging.info("%s: evaluated with other eval.* settings; evaluating again", run_dir)
        return False
    return True


def is_trained(run_dir: str, config) -> bool:
    """True when the run's newest complete checkpoint is its final step."""
    return Checkpointer.latest_complete_step(checkpoint_dir(run_dir)) == config.train.num_steps


def run_study(config, workdir: str) -> dict | None:
    """Trains and evaluates the missing runs, then compares all of them. Returns the summary,
    or None when a run was preempted (SIGTERM): its checkpoint is saved and the study stops
    there, neither evaluating it nor starting the next run; the same command resumes."""
    from cvmae_jax.evaluation.compare import compare_runs
    from cvmae_jax.evaluation.run_eval import evaluate_run
    from cvmae_jax.train import train_and_evaluate

    runs = run_configs(config, workdir)
    start, done_here = time.perf_counter(), 0
    trained_here, training_runs_s = 0, 0.0  # runs trained and evaluated now: the ETA's pace
    finished = [is_finished(d, c) for d, c in runs]
    todo = finished.count(False)
    for i, ((run_dir, run_config), done) in enumerate(zip(runs, finished), 1):
        label = f"run {i}/{len(runs)} {os.path.basename(run_dir)}"
        if done:
            logging.info("%s: finished earlier (eval/metrics.json at step %d), skipped", label,
                         run_config.train.num_steps)
            continue
        run_start = time.perf_counter()
        eta = (training_runs_s / trained_here * (todo - done_here) if trained_here
               else float("nan"))
        trained_earlier = is_trained(run_dir, run_config)
        logging.info("%s: %s ... (elapsed %s, ETA %s)", label,
                     "evaluating (trained earlier)" if trained_earlier else "training",
                     clock(run_start - start), clock(eta))
        if train_and_evaluate(run_config, run_dir)["preempted"]:
            logging.warning("%s: preempted; the study stops here (rerun the same command to "
                            "resume)", label)
            return None
        logging.info("%s: evaluating ... (elapsed %s)", label,
                     clock(time.perf_counter() - start))
        evaluate_run(run_dir, config=run_config)
        done_here += 1
        if not trained_earlier:
            trained_here += 1
            training_runs_s += time.perf_counter() - run_start
    logging.info("study: %d runs (%d trained or evaluated now) in %s; comparing", len(runs),
                 done_here, clock(time.perf_counter() - start))
    return compare_runs([d for d, _ in runs], workdir)


def _study(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    cli.log_progress()
    with cli.user_errors(resumes="the study resumes its runs from their last checkpoints"):
        check_writable(FLAGS.workdir, "the study writes its runs and report there (--workdir)")
        if run_study(FLAGS.config, FLAGS.workdir) is None:
            return
    print(f"report: {os.path.join(FLAGS.workdir, 'report.md')}")


def main() -> None:
    reuse_freed_memory()  # as train.py: the study trains in this process
    cli.define_common_flags(config_required=True)
    cli.run(_study)


if __name__ == "__main__":
    main()
