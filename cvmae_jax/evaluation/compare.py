"""``python eval.py --compare=RUN_A,RUN_B,... --workdir=OUT``: every masking strategy against
the ``random`` reference, from each run's ``eval/metrics.json``, ``metrics.jsonl`` and held-out
predictions. Writes ``OUT/summary.json``, ``OUT/report.md`` and three PNGs.

Runs are read by ``compared_runs``, summarized (paired by seed) by ``compare_summary``,
written by ``compare_report`` and ``compare_plots``. Outputs hold aggregates only, never
subject ids.
"""

from __future__ import annotations

import os

from absl import logging

from cvmae_jax.evaluation.compare_plots import plot_all
from cvmae_jax.evaluation.compare_report import report_lines
from cvmae_jax.evaluation.compare_summary import SUMMARY_FILE, summarize_runs
from cvmae_jax.evaluation.compared_runs import group_runs, load_run
from cvmae_jax.jsonio import write_json_atomic, write_text_atomic


def compare_runs(paths, workdir: str) -> dict:
    """Compares the runs in ``paths`` (training workdirs already evaluated by ``eval.py``)
    and writes the summary, report and plots to ``workdir``. Returns the summary."""
    runs = [load_run(p) for p in paths]
    groups = group_runs(runs)
    summary = summarize_runs(groups)
    os.makedirs(workdir, exist_ok=True)
    figures = plot_all(groups, summary, workdir)
    write_json_atomic(os.path.join(workdir, SUMMARY_FILE), summary)
    write_text_atomic(os.path.join(workdir, "report.md"),
                      "\n".join(report_lines(summary, figures)) + "\n")
    logging.info("compared %d runs (%s); wrote %s", len(runs), ", ".join(groups), workdir)
    return summary
