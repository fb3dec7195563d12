"""Downstream prediction: linear probes on frozen VO-MAE embeddings of MEDS label windows.

For every task folder under the labels dir (`labels/<task>/*.parquet`), each label row's input
window (the subject's selected events with time <= prediction_time, at most max_len of them
as config.eval.label_window picks: `sequences.window_rows`) is encoded by the
frozen model with no value hidden, pooled into one vector (config.eval.pooling: pooling.py),
and a standardized logistic regression is fit on train, its C chosen on tuning by AUROC
(C_GRID, half-decades: per-code vectors of thousands of columns on a few thousand rows need
strong regularization), and reported on held_out with bootstrap 95% CIs. A label row whose
window is empty (no selected lab event at or before its prediction_time) is left out of all
of it, counted and warned about; a task with a split whose rows are all such is refused. Logs
hold counts and aggregates only, never subject ids. `probe_tasks` also returns each task's
windows, embeddings and fitted `Probe` (`TaskData`), so eval.py's label-efficiency curves,
predictions and perturbations reuse them instead of embedding or fitting again.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import average_precision_score, roc_auc_score
from sklearn.preprocessing import StandardScaler

from cvmae_jax.data import meds
from cvmae_jax.data.labels import (label_files, label_windows, prediction_time_zone,
                                   window_words)
from cvmae_jax.data.pipeline import padded_rows
from cvmae_jax.evaluation.formatting import number
from cvmae_jax.evaluation.paired_stats import (NUM_BOOTSTRAP, SubjectBootstrap, one_class,
                                               percentile_ci, resampled_aurocs)
from cvmae_jax.metrics import Countdown
from cvmae_jax.pooling import DESCRIPTIONS, pool, pooled_width

C_GRID = (0.0001, 0.0003, 0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)
DEFAULT_C = 1.0
TRAIN, TUNING, TEST = meds.SPLITS  # train, tuning, held_out


def make_embed_fn(graphdef: nnx.GraphDef, pooling: str = "mean", vocab_size: int = 0):
    """Jitted (params, padded batch) -> window vectors float32 [B, W] of ``pooling``
    (pooling.py; ``per_code`` needs the ``vocab_size``) with no value hidden.
    `fn.traces` counts its traces (1 when every batch has the same shape)."""
    pooled_width(pooling, 1, vocab_size)  # refuses a per-code pooling without the vocabulary
    traces = []

    @jax.jit
    def embed(params, batch):
        traces.append(1)
        model = nnx.merge(graphdef, params)
        valid = batch["valid"]
        hidden = model.encode(batch["times"], batch["codes"], batch["values"],
                              jnp.zeros_like(valid), valid)
        return pool(pooling, hidden, batch["codes"], valid, vocab_size)

    def fn(params, batch):
        return embed(params, batch)

    fn.traces, fn.pooling = traces, pooling
    fn.width = lambda params: pooled_width(pooling, _d_model(params), vocab_size)
    return fn


def embed_label_windows(graphdef: nnx.GraphDef, params, windows: list[dict], max_len: int,
                        batch_size: int, embed_fn=None) -> np.ndarray:
    """Frozen window vectors, float32 [N, W], of `label_windows` dicts (mean-pooled unless
    `embed_fn` is a `make_embed_fn` of another pooling).

    Windows (at most max_len events) are padded to [batch_size, max_len] (the last batch padded
    with empty rows), so the encoder compiles once (pass one `make_embed_fn(graphdef)` to share
    it across calls); no value is hidden. An empty window gets a zero vector."""
    embed = embed_fn or make_embed_fn(graphdef)
    out = []
    progress = Countdown(f"eval: embedding {len(windows):,} label windows", len(windows),
                         "windows")
    for lo in range(0, len(windows), batch_size):
        chunk = windows[lo:lo + batch_size]
        batch = padded_rows(chunk, max_len, batch_size)
        del batch["example_id"]
        out.append(np.asarray(embed(params, batch))[:len(chunk)])
        progress.advance(len(chunk))
    if not out:
        return np.zeros((0, embed.width(params)), np.float32)
    return np.concatenate(out).astype(np.float32)


def _d_model(params) -> int:
    """d_model, read from the final LayerNorm scale if present (for an empty [0, W] result)."""
    try:
        return int(params["final_norm"]["scale"][...].shape[-1])
    except (KeyError, TypeError, IndexError):
        return 0


@dataclasses.dataclass(frozen=True)
class Probe:
    """A fitted standardized logistic regression (StandardScaler fit on train, then the model)."""

    scaler: StandardScaler
    model: LogisticRegression
    C: float

    def decision(self, x: np.ndarray) -> np.ndarray:
        """Decision function float64 [N] of window vectors x [N, W] (monotone in the
        probability; used for AUROC/AUPRC)."""
        return self.model.decision_function(self.scaler.transform(x)) if len(x) else np.zeros(0)

    def probability(self, x: np.ndarray) -> np.ndarray:
        """P(label = True) float64 [N] of window vectors x [N, W]."""
        if not len(x):
            return np.zeros(0)
        return self.model.predict_proba(self.scaler.transform(x))[:, 1].astype(np.float64)


def fit_probe(train_x, train_y, c: float, seed: int = 0) -> Probe:
    """StandardScaler + LogisticRegression(C=c) fit on (train_x [N, W], train_y [N]); both
    classes needed."""
    scaler = StandardScaler().fit(train_x)
    model = LogisticRegression(C=c, max_iter=2000, random_state=seed)
    return Probe(scaler, model.fit(scaler.transform(train_x), np.asarray(train_y).astype(int)),
                 float(c))


def select_c(train_x, train_y, tuning_x, tuning_y, seed: int = 0) -> tuple[float, str,
                                                                            float | None]:
    """(C, how it was chosen, its tuning AUROC): the C_GRID value with the best tuning AUROC
    (ties: closest to 1), or DEFAULT_C when tuning has a single class. x: [N, W], y: [N]."""
    if one_class(tuning_y):
        return DEFAULT_C, ("default (tuning split has one class)" if len(tuning_y) else
                           "default (tuning split has no label rows)"), None
    scores = {c: roc_auc_score(tuning_y, fit_probe(train_x, train_y, c, seed).decision(tuning_x))
              for c in C_GRID}
    best = max(C_GRID, key=lambda c: (scores[c], -abs(np.log10(c))))
    return best, "tuning AUROC", float(scores[best])


def fit_task_probe(train_X, train_y, tuning_X, tuning_y, test_X, test_y, seed: int = 0,
                   test_subjects=None) -> tuple[dict, Probe | None]:
    """`probe_task`'s result and the fitted probe (None when train has a single class), so
    predictions and perturbations reuse the probe instead of fitting it again."""
    train_y, tuning_y, test_y = (np.asarray(y).astype(int) for y in (train_y, tuning_y, test_y))
    result = dict(seed=int(seed), split=TEST, num_bootstrap=NUM_BOOTSTRAP, c_grid=list(C_GRID),
                  n=int(len(test_y)), n_train=int(len(train_y)), n_tuning=int(len(tuning_y)),
                  positives=int(test_y.sum()),
                  prevalence=float(test_y.mean()) if len(test_y) else None,
                  train_prevalence=float(train_y.mean()) if len(train_y) else None,
                  tuning_prevalence=float(tuning_y.mean()) if len(tuning_y) else None,
                  C=None, c_selection=None, tuning_auroc=None,
                  auroc=None, auroc_ci=None, auprc=None, auprc_ci=None,
                  bootstrap_used=0, n_subjects=None, reason=None)
    if one_class(train_y):
        result["reason"] = single_class_reason(train_y)
        return result, None
    best_c, result["c_selection"], result["tuning_auroc"] = select_c(train_X, train_y, tuning_X,
                                                                     tuning_y, seed)
    result["C"] = float(best_c)
    probe = fit_probe(train_X, train_y, best_c, seed)
    if len(test_y) == 0:
        result["reason"] = f"{TEST} split has no label rows"
        return result, probe
    if one_class(test_y):
        result["reason"] = (f"{TEST} split has a single class ({result['positives']} positives "
                            f"of {len(test_y)}): AUROC/AUPRC undefined")
        return result, probe
    result.update(held_out_metrics(test_y, probe.decision(test_X), seed, test_subjects))
    return result, probe


def held_out_metrics(test_y, score, seed: int = 0, test_subjects=None) -> dict:
    """AUROC and AUPRC of ``score`` [N] on labels ``test_y`` [N] (both classes present) with
    subject-bootstrap 95% CIs (``probe_task``): auroc, auroc_ci, auprc, auprc_ci,
    bootstrap_used, n_subjects."""
    test_y = np.asarray(test_y).astype(int)
    if test_subjects is not None and len(test_subjects) != len(test_y):
        raise ValueError(f"{len(test_subjects)} test_subjects for {len(test_y)} test rows")
    bootstrap = SubjectBootstrap(np.arange(len(test_y)) if test_subjects is None
                                 else test_subjects, seed)
    aurocs = resampled_aurocs(test_y, score, bootstrap)  # NaN where a resample has one class
    return dict(auroc=float(roc_auc_score(test_y, score)),
                auroc_ci=percentile_ci(aurocs),
                auprc=float(average_precision_score(test_y, score)),
                auprc_ci=percentile_ci(_resampled_auprcs(test_y, score, bootstrap, aurocs)),
                bootstrap_used=int(np.isfinite(aurocs).sum()),
                n_subjects=bootstrap.n_subjects)  # of the test rows: the bootstrap's unit


def _resampled_auprcs(y, score, bootstrap: SubjectBootstrap, aurocs) -> list[float]:
    """AUPRC on each resample with both classes (finite ``aurocs``), rows weighted by draws."""
    weights = (w for chunk in bootstrap.weights() for w in chunk)
    return [average_precision_score(y[w > 0], score[w > 0], sample_weight=w[w > 0])
            for w, auroc in zip(weights, aurocs) if np.isfinite(auroc)]


def probe_task(train_X, train_y, tuning_X, tuning_y, test_X, test_y, seed: int = 0,
               test_subjects=None) -> dict:
    """Standardized logistic-regression probe: fit on train, C by tuning AUROC, report held_out.

    Returns a dict with n / positives / prevalence per split, the chosen C (and why), and on
    held_out: auroc, auprc and their bootstrap 95% CIs (`*_ci`, [lo, hi]; resampling
    ``test_subjects``, the subject id of each test row, so a subject's rows stay together;
    None: each row its own subject), or None with `reason` when the probe or the metric cannot
    be computed (never raises for one class)."""
    return fit_task_probe(train_X, train_y, tuning_X, tuning_y, test_X, test_y, seed,
                          test_subjects)[0]


def find_tasks(labels_dir: str | Path) -> tuple[dict[str, Path], list[str]]:
    """({task name: folder}, unread): the subfolders of labels_dir holding *.parquet files
    (symbolic links followed), and a line for each folder without any, each label file outside
    a task folder and each broken link (not read)."""
    labels_dir = Path(labels_dir)
    if not labels_dir.is_dir():
        return {}, []
    tasks, unread = {}, []
    for p in sorted(labels_dir.iterdir()):
        if p.is_dir() and meds.find_parquet_files(p).files:
            tasks[p.name] = p
        elif p.is_dir():
            unread.append(f"{p}: a task folder without *.parquet label files, skipped")
        elif p.suffix == ".parquet":
            unread.append(f"{p}: a label file outside a task folder (expected "
                          "<labels_dir>/<task>/*.parquet), not read")
        elif p.is_symlink() and not p.exists():
            unread.append(f"{p}: a symbolic link to {os.readlink(p)}, which does not exist; "
                          "skipped")
    return tasks, unread


def read_label_tasks(meds_dir: str, stats, max_len: int, labels_dir: str | None = None,
                     each_code_latest: bool = False) -> tuple[str, dict[str, LabelTask]]:
    """(labels dir, {task: LabelTask}) of every task folder under labels_dir (`read_task`;
    ``max_len`` and ``each_code_latest`` choose each window's events: `sequences.window_rows`).

    labels_dir None means ``<meds_dir>/labels``, which may be absent (no downstream tasks). A
    labels_dir given explicitly must exist and hold at least one task folder. Folders and files
    that hold no task are logged as warnings. A label file that cannot be read, or a task with
    nothing to evaluate, raises MEDSFormatError naming it, before any model work."""
    explicit = bool(labels_dir)
    labels_dir = str(labels_dir or os.path.join(meds_dir, "labels"))
    tasks, unread = find_tasks(labels_dir)
    for line in unread:
        logging.warning("labels: %s", line)
    if explicit and not tasks:
        problem = ("no task folder with *.parquet label files in it" if os.path.isdir(labels_dir)
                   else "no such folder")
        raise FileNotFoundError(f"config.eval.labels_dir={labels_dir}: {problem} (expected "
                                "<labels_dir>/<task>/*.parquet)")
    return labels_dir, {task: read_task(meds_dir, task_dir, stats, max_len, each_code_latest)
                        for task, task_dir in tasks.items()}


def task_windows(meds_dir, task_dir, stats, max_len: int,
                 each_code_latest: bool = False) -> dict[str, list[dict]]:
    """Label windows of every file in task_dir, grouped by the subject's split, each split in
    label-file order (files sorted by path, then row order); each window's `label_file` is the
    index of its file in `label_files(task_dir)` and its `example_id` the row in that file."""
    subject_splits = meds.read_subject_splits(meds_dir)
    by_split = {s: [] for s in meds.SPLITS}
    for f, path in enumerate(label_files(task_dir)):
        for w in label_windows(meds_dir, path, stats, max_len, each_code_latest):
            w["label_file"] = np.int64(f)
            by_split[subject_splits[int(w["subject_id"])]].append(w)
    for ws in by_split.values():
        ws.sort(key=lambda w: (int(w["label_file"]), int(w["example_id"])))
    return by_split


class LabelTask(NamedTuple):
    """One task folder, its usable label windows per split (``read_task``) and per split the
    counts {rows, empty_windows} of its label rows."""

    task_dir: Path
    windows: dict[str, list[dict]]
    rows: dict[str, dict[str, int]]


def single_class_reason(train_y: np.ndarray) -> str:
    """Why nothing is fit on train labels ``train_y`` [N] of one class (or none)."""
    return (f"train split has a single class ({int(np.sum(train_y))} positives of "
            f"{len(train_y)} rows)")


def read_task(meds_dir, task_dir, stats, max_len: int,
              each_code_latest: bool = False) -> LabelTask:
    """The task's label windows (``task_windows``) less those that are empty: no selected lab
    event at or before the row's prediction_time, so nothing to embed; a metric on them would
    only measure the probe's constant. Empty windows, and rows repeating another's subject and
    prediction time, are counted and logged as a warning; a split whose label rows all have an
    empty window raises MEDSFormatError, as do a train split without both classes (no probe
    can be fit) and label files of the task with different time zones."""
    windows = task_windows(meds_dir, task_dir, stats, max_len, each_code_latest)
    prediction_time_zone(label_files(task_dir))
    rows = {s: dict(rows=len(ws), empty_windows=sum(len(w["codes"]) == 0 for w in ws))
            for s, ws in windows.items()}
    for split, r in rows.items():
        if r["rows"] and r["rows"] == r["empty_windows"]:
            raise meds.MEDSFormatError(
                f"{task_dir}: all {r['rows']} {split} label rows have an empty window (no "
                "selected lab event at or before their prediction_time, e.g. prediction times "
                "before the subjects' first lab event): no metric can rest on them")
    train = [bool(w["label"]) for w in windows[TRAIN] if len(w["codes"])]
    if one_class(train):
        raise meds.MEDSFormatError(
            f"{task_dir}: the train split has {len(train)} label rows with a window, "
            f"{sum(train)} of them positive (boolean_value true): a probe needs both classes "
            "on train; check the task's label files and metadata/subject_splits.parquet")
    if any(r["empty_windows"] for r in rows.values()):
        logging.warning("labels %s: %s", task_dir, empty_windows_words(rows))
    keys = [(int(w["subject_id"]), int(w["prediction_time_us"]))
            for ws in windows.values() for w in ws]
    if len(keys) > len(set(keys)):
        logging.warning("labels %s: %d label rows repeat another row's subject_id and "
                        "prediction_time (the task's %d files, subfolders included, are all "
                        "read); each is scored, so a repeated row counts twice: look for a "
                        "copied file", task_dir, len(keys) - len(set(keys)),
                        len(label_files(task_dir)))
    return LabelTask(Path(task_dir), {s: [w for w in ws if len(w["codes"])]
                                      for s, ws in windows.items()}, rows)


def empty_windows_words(rows: dict[str, dict[str, int]]) -> str:
    """What the report and the console say of a task's label rows with empty windows."""
    per_split = ", ".join(f"{s} {r['empty_windows']} of {r['rows']}" for s, r in rows.items())
    return (f"label rows with an empty window ({per_split}): no selected lab event at or before "
            "their prediction_time; left out of the probe, its metrics and the exports")


@dataclasses.dataclass
class TaskData:
    """One task's label windows, frozen window vectors x float32 [N, W] (W: the pooling's
    width) and labels y bool [N] per split (in label-file order) and its probe fit on train
    (None when it cannot be fit)."""

    task_dir: Path
    windows: dict[str, list[dict]]
    x: dict[str, np.ndarray]
    y: dict[str, np.ndarray]
    probe: Probe | None


def probe_tasks(graphdef, params, labels_dir: str, label_tasks: dict[str, LabelTask],
                max_len: int, batch_size: int, seed: int = 0, embed_fn=None,
                each_code_latest: bool = False) -> tuple[dict, dict[str, TaskData]]:
    """Probe results {"labels_dir", "seed", "split", "label_max_len", "label_window" (words of
    the windows' events, `labels.window_words`), "probe" (words of the classifier and what it
    reads), "tasks": {task: probe_task dict + n per split, label_rows and empty_windows per
    split}, "unread": lines of `find_tasks`, "embed_traces": the encoder's traces} (without
    tasks: "tasks" empty and a "note", no "embed_traces") and, per task, its TaskData (for
    label efficiency, exports and perturbations, which reuse the embeddings and the probe).
    `embed_fn`: a `make_embed_fn` (its pooling; default mean)."""
    embed_fn = embed_fn or make_embed_fn(graphdef)
    out = dict(labels_dir=labels_dir, seed=int(seed), split=TEST, label_max_len=int(max_len),
               label_window=window_words(max_len, each_code_latest),
               probe=f"standardized logistic regression on {DESCRIPTIONS[embed_fn.pooling]}",
               tasks={}, unread=find_tasks(labels_dir)[1])
    data: dict[str, TaskData] = {}
    if not label_tasks:
        out["note"] = f"no label tasks found under {labels_dir}; downstream prediction skipped"
        logging.info("downstream: %s", out["note"])
        return out, data
    for task, (task_dir, windows, rows) in label_tasks.items():
        x = {split: embed_label_windows(graphdef, params, ws, max_len, batch_size, embed_fn)
             for split, ws in windows.items()}
        y = {split: np.array([bool(w["label"]) for w in ws], bool)
             for split, ws in windows.items()}
        result, probe = fit_task_probe(
            x[TRAIN], y[TRAIN], x[TUNING], y[TUNING], x[TEST], y[TEST], seed=seed,
            test_subjects=[int(w["subject_id"]) for w in windows[TEST]])
        result["label_rows"] = {s: r["rows"] for s, r in rows.items()}
        result["empty_windows"] = {s: r["empty_windows"] for s, r in rows.items()}
        out["tasks"][task] = result
        data[task] = TaskData(task_dir, windows, x, y, probe)
        log_probe(task, result)
    out["embed_traces"] = len(embed_fn.traces)
    return out, data


FEW_LABELS = 10  # fewer positives or negatives than this on held_out: the report says so


def log_probe(task: str, result: dict) -> None:
    """One console line of a task's probe (``fit_task_probe``'s ``result`` with its
    ``empty_windows``): a warning when held_out has no metric or few rows of a class."""
    few = _rests_on_few_labels(result)
    log = logging.warning if result["reason"] or few else logging.info
    log("downstream %s: n train/tuning/%s = %d/%d/%d, %s prevalence %s, "
        "C=%s (%s), AUROC %s, AUPRC %s%s%s%s", task, TEST, result["n_train"],
        result["n_tuning"], result["n"], TEST, number(result["prevalence"]),
        result["C"], result["c_selection"], number(result["auroc"]), number(result["auprc"]),
        f" ({result['reason']})" if result["reason"] else "",
        f" ({result['positives']} positive of {result['n']}: fewer than {FEW_LABELS} of a "
        "class, anecdotal)" if few else "",
        f"; {sum(result['empty_windows'].values())} label rows with an empty window "
        "left out" if any(result["empty_windows"].values()) else "")


def few_labels(n: int, positives: int) -> bool:
    """Whether ``n`` rows with ``positives`` hold fewer than FEW_LABELS rows of a class."""
    return min(positives, n - positives) < FEW_LABELS


def _rests_on_few_labels(r: dict) -> bool:
    """Whether a held_out AUROC (a probe result ``r``) rests on few rows of a class."""
    return r.get("auroc") is not None and few_labels(r.get("n") or 0, r.get("positives") or 0)


def _few_labels_note(task: str, r: dict) -> list[str]:
    """A note when held_out has few rows of a class: the AUROC rests on them, and resamples
    without one class are dropped, so the CI is conditional on having both (too narrow)."""
    if not _rests_on_few_labels(r):
        return []
    n, pos = r["n"], r["positives"]
    return [f"- {task}: {pos} positive and {n - pos} negative held_out rows: the AUROC rests on "
            f"the {min(pos, n - pos)} row(s) of the smaller class, and its CI on the "
            f"{r.get('bootstrap_used')} of {NUM_BOOTSTRAP} resamples that hold both classes "
            "(narrower than the uncertainty); read it as anecdotal"]


def report_lines(downstream: dict) -> list[str]:
    """Markdown section for eval/report.md."""
    lines = ["", f"## Downstream prediction on `{downstream.get('split', TEST)}`", ""]
    unread = [f"- **Warning:** {line}" for line in downstream.get("unread", [])]
    if not downstream["tasks"]:
        return lines + [downstream.get("note", "no label tasks"), ""] + (
            unread + [""] if unread else [])
    window = (f" of each label row's window: {downstream['label_window']}"
              if "label_window" in downstream else "")
    lines += [f"Linear probe ({downstream['probe']}{window}), C chosen on tuning by AUROC "
              f"(C=1 when tuning has one class); 95% CIs from {NUM_BOOTSTRAP} bootstrap "
              f"resamples of held_out's subjects (a subject's label rows stay together), seed "
              f"{downstream['seed']}.", "",
              "| task | n test (subjects) | prevalence | AUROC [95% CI] | AUPRC [95% CI] |",
              "|---|---:|---:|---|---|"]
    notes = []

    def cell(value, ci):
        if value is None:
            return "n/a"
        return f"{value:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")

    for task, r in downstream["tasks"].items():
        prev = r.get("prevalence")
        subjects = f" ({r['n_subjects']})" if r.get("n_subjects") is not None else ""
        notes += _few_labels_note(task, r)
        lines.append(f"| {task} | {r.get('n', 0)}{subjects} | {number(prev)} | "
                     f"{cell(r.get('auroc'), r.get('auroc_ci'))} | "
                     f"{cell(r.get('auprc'), r.get('auprc_ci'))} |")
        if r.get("reason"):
            notes.append(f"- {task}: {r['reason']}")
        if str(r.get("c_selection", "")).startswith("default"):
            notes.append(f"- {task}: C={r['C']:g}, the {r['c_selection']}: nothing on this task "
                         "is chosen on tuning (C, the aggregates' settings, fine-tuning's "
                         "stopping step)")
        if any(r.get("empty_windows", {}).values()):
            rows = {s: dict(rows=n, empty_windows=r["empty_windows"][s])
                    for s, n in r["label_rows"].items()}
            notes.append(f"- **Warning:** {task}: {empty_windows_words(rows)}")
    notes += unread
    return lines + ([""] + notes if notes else []) + [""]
