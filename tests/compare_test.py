"""Strategy comparison on hand-made runs with known answers: win rate, Wilcoxon, Cohen's d,
paired-bootstrap AUROC deltas, convergence, pooling over seeds, outputs and CLI errors."""

import json
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from scipy import special
from scipy.stats import wilcoxon
from sklearn.metrics import roc_auc_score

from cvmae_jax.evaluation import compare, paired_stats
from cvmae_jax.evaluation.compare_report import report_lines
from cvmae_jax.evaluation.compare_summary import convergence, summarize_runs
from cvmae_jax.evaluation.compared_runs import group_runs, load_run
from cvmae_jax.evaluation.paired_predictions import BOOTSTRAP_SEED

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CODES = ("LAB//A", "LAB//B", "LAB//C", "LAB//D")
NAMES = {"LAB//A": "Albumin [g/dL]", "LAB//B": "B | with a pipe", "LAB//C": "LAB//C",
         "LAB//D": "D-dimer"}  # LAB//C: no description in codes.parquet
SUBJECT_BASE = 987_654_000  # subject ids that must never reach a report


def make_run(root, strategy, seed, mses, curve=((100, 1.0), (200, 0.8)), task_scores=None,
             label_efficiency=None, locf_mses=(1.0,) * len(CODES), task_extra=None,
             finetuned_scores=None, finetune_settings=None, **extra):
    """A training workdir with config.json, metrics.jsonl and eval/metrics.json (+ predictions
    of each task in ``task_scores``: {task: (labels, scores)}; ``label_efficiency``: {k: mean
    AUROC} for every task; ``locf_mses``: carry-forward's per-lab MSE; ``task_extra``: fields
    added to every task's result; ``finetuned_scores``: the fine-tuned model's predictions,
    as ``task_scores``; ``finetune_settings``: eval.py's record of them, downstream.finetune)."""
    path = root / f"{strategy}_s{seed}"
    (path / "eval").mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"seed": seed,
                                                  "masking": {"strategy": strategy}}))
    with open(path / "metrics.jsonl", "w") as f:
        for step, mse in curve:
            f.write(json.dumps({"step": step, "loss": 1.0, "masked_mse": 9.9}) + "\n")
            f.write(json.dumps({"step": step, "split": "tuning", "masked_mse": mse}) + "\n")
    per_code = [dict(code=c, name=NAMES[c], num_masked=50, mse=m, mae=m, rmse=m ** 0.5,
                     baseline_mse=1.0, locf_mse=locf, raw_rmse=m, raw_mae=m, cv=0.1 * (i + 1),
                     train_mask_prob=0.3)
                for i, (c, m, locf) in enumerate(zip(CODES, mses, locf_mses))]
    tasks = {}
    for task, (labels, scores) in (task_scores or {}).items():
        auroc = roc_auc_score(labels, scores)
        tasks[task] = dict(auroc=auroc, auroc_ci=[auroc - 0.05, auroc + 0.05], n=len(labels),
                           positives=int(np.sum(labels)), prevalence=float(np.mean(labels)),
                           reason=None)
        if label_efficiency:
            tasks[task]["label_efficiency"] = {k: dict(auroc_mean=v, draws=5)
                                               for k, v in label_efficiency.items()}
        tasks[task].update(task_extra or {})
        write_predictions(path, task, labels, scores)
    for task, (labels, scores) in (finetuned_scores or {}).items():
        write_predictions(path, task, labels, scores, folder="predictions_pretrained")
    overall = dict(num_masked=200, masked_mse=float(np.mean(mses)),
                   mse_vs_baseline=float(np.mean(mses)),
                   mse_vs_locf=float(np.mean(mses) / np.mean(locf_mses)))
    metrics = dict(overall=overall,
                   per_code=per_code, step=curve[-1][0], split="held_out", strategy=strategy,
                   eval_mask=dict(rate=0.3, seed=1234),
                   downstream=dict(seed=seed, split="held_out", tasks=tasks,
                                   **({} if finetune_settings is None
                                      else dict(finetune=finetune_settings))),
                   **{"cv_threshold": 0.25, **extra})
    (path / "eval" / "metrics.json").write_text(json.dumps(metrics))
    return str(path)


def write_predictions(run_path, task, labels, scores, order=None, folder="predictions",
                      rows_per_subject=1):
    """Row i of labels/scores belongs to subject i // rows_per_subject; rows written in
    ``order``."""
    order = np.arange(len(labels)) if order is None else order
    folder = os.path.join(run_path, "eval", folder, task)
    os.makedirs(folder, exist_ok=True)
    table = pa.table({
        "subject_id": pa.array(SUBJECT_BASE + order // rows_per_subject, pa.int64()),
        "prediction_time": pa.array((1_600_000_000_000_000 + 3_600_000_000 * order),
                                    pa.timestamp("us")),
        "boolean_value": pa.array(np.asarray(labels, bool)[order]),
        "predicted_boolean_probability": pa.array(np.asarray(scores, np.float64)[order]),
    })
    pq.write_table(table, os.path.join(folder, "held_out.parquet"))


def summarize_paths(paths):
    """summary.json's content for the runs at ``paths``."""
    return summarize_runs(group_runs([load_run(p) for p in paths]))


def binormal(n, shift, rng, labels=None):
    """Labels and scores ~ N(shift * label, 1): population AUROC = Phi(shift / sqrt(2))."""
    labels = rng.random(n) < 0.3 if labels is None else labels
    return labels, shift * labels + rng.standard_normal(n)


def test_win_rate_wilcoxon_and_cohens_d_on_known_labs(tmp_path):
    ref = make_run(tmp_path, "random", 0, [1.0, 1.0, 1.0, 1.0])
    cv = make_run(tmp_path, "cv", 0, [0.8, 0.9, 0.7, 1.2])  # 3 of 4 labs better
    lab = summarize_paths((ref, cv))[
        "strategies"]["cv"]["vs_random"]["reconstruction"]["uniform"]["pooled"]
    diffs = [0.2, 0.1, 0.3, -0.2]
    assert lab["n_labs"] == 4 and lab["win_rate"] == 0.75
    assert lab["wilcoxon_p"] == pytest.approx(wilcoxon(diffs).pvalue)
    assert lab["cohens_d"] == pytest.approx(np.mean(diffs) / np.std(diffs, ddof=1))
    assert lab["cohens_d"] > 0  # positive = better than random


def test_ties_count_half_and_a_worse_strategy_has_negative_d():
    tied = paired_stats.lab_comparison([0.1, 0.0, -0.1, 0.2])
    assert tied["win_rate"] == pytest.approx(2.5 / 4) and tied["ties"] == 1
    worse = paired_stats.lab_comparison([-0.2, -0.1, -0.3, 0.05])
    assert worse["win_rate"] == 0.25 and worse["cohens_d"] < 0
    none = paired_stats.lab_comparison([0.0, 0.0])
    assert none["wilcoxon_p"] is None and "no test" in none["reason"]


def test_labs_pair_by_code_and_skip_unmasked_ones(tmp_path):
    ref = make_run(tmp_path, "random", 0, [1.0, 1.0, 1.0, 1.0])
    cv = make_run(tmp_path, "cv", 0, [0.8, 0.9, 0.7, 1.2])
    with open(os.path.join(cv, "eval", "metrics.json")) as f:
        metrics = json.load(f)
    metrics["per_code"] = metrics["per_code"][::-1]  # another order: pairing is by code
    metrics["per_code"][0]["num_masked"] = 0  # LAB//D not evaluated -> left out
    with open(os.path.join(cv, "eval", "metrics.json"), "w") as f:
        json.dump(metrics, f)
    lab = summarize_paths((ref, cv))[
        "strategies"]["cv"]["vs_random"]["reconstruction"]["uniform"]
    assert [x["code"] for x in lab["per_lab"]] == ["LAB//A", "LAB//B", "LAB//C"]
    assert lab["pooled"]["win_rate"] == 1.0


def test_seeds_pair_by_seed_and_pool_lab_mses_first(tmp_path):
    runs = [make_run(tmp_path, "random", 0, [1.0, 1.0, 1.0, 1.0]),
            make_run(tmp_path, "random", 1, [1.5, 1.0, 1.0, 1.0]),
            make_run(tmp_path, "cv", 0, [0.75, 1.25, 0.75, 1.0]),
            make_run(tmp_path, "cv", 1, [1.75, 0.75, 1.0, 0.75])]
    summary = summarize_paths(runs)
    lab = summary["strategies"]["cv"]["vs_random"]["reconstruction"]["uniform"]
    # seed means: random [1.25, 1, 1, 1], cv [1.25, 1, .875, .875] -> diffs [0, 0, .125, .125]
    assert [x["diff"] for x in lab["per_lab"]] == [0, 0, 0.125, 0.125]
    assert lab["pooled"]["win_rate"] == (2 + 0.5 * 2) / 4
    assert lab["per_seed"]["1"]["win_rate"] == 2.5 / 4  # diffs -.25, .25, 0, .25
    assert summary["strategies"]["cv"]["masked_mse"]["per_seed"] == {"0": 0.9375, "1": 1.0625}


def test_seed_noise_floor_compares_the_reference_with_itself(tmp_path):
    random_mses = {0: [1.0, 1.0, 1.0, 1.0], 1: [0.5, 0.6, 0.7, 1.2]}
    runs = [make_run(tmp_path, strategy, seed, random_mses[seed] if strategy == "random"
                     else [0.8, 0.9, 0.7, 1.2]) for strategy in ("random", "cv") for seed in (0, 1)]
    summary = summarize_paths(runs)
    floor = summary["seed_noise_floor"]
    diffs = [0.5, 0.4, 0.3, -0.2]  # MSE(random s0) - MSE(random s1) per lab: seed 1 wins 3
    assert floor["seeds"] == [0, 1] and floor["win_rate"] == 0.75
    assert floor["mean_diff"] == pytest.approx(np.mean(diffs)) and floor["cohens_d"] > 0
    assert floor["wilcoxon_p"] == pytest.approx(wilcoxon(diffs).pvalue)
    line = [x for x in report_lines(summary, []) if "Seed noise floor" in x][0]
    assert "`random` seed 1 vs `random` seed 0" in line and "win rate 0.75 (4)" in line
    one_seed = summarize_paths(runs[::2])
    assert one_seed["seed_noise_floor"] is None
    assert any("needs two `random` seeds" in x for x in report_lines(one_seed, []))


def test_paired_bootstrap_ci_contains_the_true_auroc_delta(tmp_path):
    rng = np.random.default_rng(0)
    labels, ref_scores = binormal(2000, 0.5, rng)
    _, cv_scores = binormal(2000, 1.5, rng, labels)
    true_delta = special.ndtr(1.5 / 2 ** 0.5) - special.ndtr(0.5 / 2 ** 0.5)  # 0.218
    ref = make_run(tmp_path, "random", 0, [1.0] * 4, task_scores={"death": (labels, ref_scores)})
    cv = make_run(tmp_path, "cv", 0, [1.0] * 4, task_scores={"death": (labels, cv_scores)})
    write_predictions(cv, "death", labels, cv_scores, order=rng.permutation(2000))  # shuffled
    delta = summarize_paths((ref, cv))[
        "strategies"]["cv"]["vs_random"]["auroc_delta"]["death"]
    sample = roc_auc_score(labels, cv_scores) - roc_auc_score(labels, ref_scores)
    assert delta["delta"] == pytest.approx(sample)  # rows aligned despite the shuffle
    lo, hi = delta["ci"]
    assert lo < true_delta < hi and lo > 0
    assert hi - lo < 0.1 and delta["n"] == 2000
    assert delta["method"] == "paired bootstrap of subjects" and delta["subjects"] == 2000


def test_the_auroc_delta_resamples_subjects_not_rows(tmp_path):
    rng = np.random.default_rng(5)
    labels, ref_scores = binormal(300, 0.5, rng)
    _, cv_scores = binormal(300, 1.0, rng, labels)
    runs = []
    for strategy, scores in (("random", ref_scores), ("cv", cv_scores)):
        runs.append(make_run(tmp_path, strategy, 0, [1.0] * 4,
                             task_scores={"death": (labels, scores)}))
        write_predictions(runs[-1], "death", labels, scores, rows_per_subject=3)
    delta = summarize_paths(runs)["strategies"]["cv"]["vs_random"]["auroc_delta"]["death"]
    assert delta["n"] == 300 and delta["subjects"] == 100
    bootstrap = paired_stats.SubjectBootstrap(np.arange(300) // 3, BOOTSTRAP_SEED)
    resampled = [paired_stats.resampled_aurocs(labels, s, bootstrap)
                 for s in (cv_scores, ref_scores)]
    np.testing.assert_allclose(delta["ci"], paired_stats.percentile_ci(resampled[0] - resampled[1]))


def test_a_single_class_task_says_there_is_no_auroc(tmp_path):
    rng = np.random.default_rng(4)
    labels, scores = binormal(60, 1.0, rng)
    paths = [make_run(tmp_path, s, 0, [1.0] * 4, task_scores={"death": (labels, scores)})
             for s in ("random", "cv")]
    for path in paths:  # held_out with one class: eval.py wrote no AUROC
        write_predictions(path, "death", np.zeros(60, bool), scores)
        metrics_path = os.path.join(path, "eval", "metrics.json")
        with open(metrics_path) as f:
            metrics = json.load(f)
        metrics["downstream"]["tasks"]["death"].update(auroc=None, auroc_ci=None)
        with open(metrics_path, "w") as f:
            json.dump(metrics, f)
    summary = summarize_paths(paths)
    delta = summary["strategies"]["cv"]["vs_random"]["auroc_delta"]["death"]
    assert delta["delta"] is None
    assert delta["note"] == ("the 60 held_out rows shared by the runs' predictions hold one "
                             "class: no AUROC (eval/metrics.json has none either)")


def test_the_report_says_which_labs_and_rows_its_statistics_rest_on(tmp_path):
    """Labs withheld from every run's per-lab rows, and a task with few positives, are named
    in the study's report beside the statistics they limit."""
    rng = np.random.default_rng(5)
    labels = np.zeros(40, bool)
    labels[:3] = True  # 3 positives: anecdotal
    scores = rng.random(40) + labels
    paths = [make_run(tmp_path, s, 0, [1.0, 0.9, 0.8, 0.7],
                      task_scores={"death": (labels, scores)},
                      suppressed=dict(rows=2, min_subjects=10)) for s in ("random", "cv")]
    summary = summarize_paths(paths)
    assert summary["labs"] == 4 and summary["suppressed"] == dict(rows=2, min_subjects=10)
    text = "\n".join(report_lines(summary, []))
    assert ("death: n = 40 shared rows of 40 subjects, 3 positive (fewer than 10 of a class: "
            "a resample without both classes has no AUROC and is left out") in text
    assert ("- labs in the per-lab statistics (win rate, Wilcoxon p, Cohen's d, the per-lab "
            "table): 2 of the 4 labs are withheld") in text
    assert "masked MSE pools every lab" in text


def test_subject_bootstrap_auroc_equals_sklearn_on_the_resampled_rows():
    rng = np.random.default_rng(1)
    subjects = rng.integers(0, 30, 80)  # 80 label rows of 30 subjects
    labels = rng.random(80) < 0.4
    scores = np.round(rng.random(80) + labels * 0.3, 1)  # many ties
    bootstrap = paired_stats.SubjectBootstrap(subjects, seed=3, num=150)
    weights = np.concatenate(list(bootstrap.weights()))
    assert weights.shape == (150, 80) and bootstrap.n_subjects == len(np.unique(subjects))
    for s in np.unique(subjects):  # a subject's rows are drawn together
        assert (weights[:, subjects == s] == weights[:, subjects == s][:, :1]).all()
    first_rows = np.unique(subjects, return_index=True)[1]
    assert (weights[:, first_rows].sum(1) == bootstrap.n_subjects).all()  # draws per resample
    got = paired_stats.resampled_aurocs(labels, scores, bootstrap)
    want = [roc_auc_score(np.repeat(labels, w), np.repeat(scores, w)) for w in weights]
    np.testing.assert_allclose(got, want, rtol=1e-12)
    np.testing.assert_array_equal(got, paired_stats.resampled_aurocs(labels, scores, bootstrap))
    one_class = paired_stats.resampled_aurocs(
        np.zeros(5, bool), np.arange(5.0), paired_stats.SubjectBootstrap(np.arange(5), 0, 2))
    assert np.isnan(one_class).all()


def test_subject_bootstrap_is_unchanged_by_repeating_each_subjects_rows():
    """A subject with k identical rows carries no more evidence than with one: the subject
    bootstrap's AUROCs are the same (a bootstrap of rows would narrow the CI by ~sqrt(k))."""
    rng = np.random.default_rng(4)
    labels, scores = binormal(60, 0.8, rng)
    once = paired_stats.resampled_aurocs(labels, scores,
                                         paired_stats.SubjectBootstrap(np.arange(60), 0))
    repeated = paired_stats.resampled_aurocs(
        np.repeat(labels, 5), np.repeat(scores, 5),
        paired_stats.SubjectBootstrap(np.repeat(np.arange(60), 5), 0))
    np.testing.assert_allclose(repeated, once, rtol=1e-12)


def test_missing_predictions_fall_back_to_the_two_aurocs_without_ci(tmp_path):
    rng = np.random.default_rng(2)
    labels, a = binormal(200, 0.5, rng)
    _, b = binormal(200, 1.0, rng, labels)
    ref = make_run(tmp_path, "random", 0, [1.0] * 4, task_scores={"death": (labels, a)})
    cv = make_run(tmp_path, "cv", 0, [1.0] * 4, task_scores={"death": (labels, b)})
    os.remove(os.path.join(cv, "eval", "predictions", "death", "held_out.parquet"))
    delta = summarize_paths((ref, cv))[
        "strategies"]["cv"]["vs_random"]["auroc_delta"]["death"]
    assert delta["ci"] is None and "no held_out predictions for cv_s0" in delta["note"]
    assert delta["delta"] == pytest.approx(roc_auc_score(labels, b) - roc_auc_score(labels, a))


def test_convergence_ratio_is_steps_to_randoms_final_mse_over_randoms_own_steps():
    ref = [(100, 1.0), (200, 0.9), (300, 0.8), (400, 0.75), (500, 0.7)]
    assert convergence([(100, 0.95), (200, 0.8), (300, 0.7), (400, 0.6)], ref) == dict(
        step=300, reference_step=500, reference_final_step=500, target_masked_mse=0.7,
        ratio=0.6, reason=None)
    never = convergence([(100, 0.95), (300, 0.705), (500, 0.71)], ref)
    assert never["ratio"] is None
    assert never["reason"] == "never reached 0.7 in 500 steps (best 0.705, at step 300)"
    assert "no validation lines" in convergence([], ref)["reason"]
    plateau = [(100, 0.80), (200, 0.70), (300, 0.72), (400, 0.71), (500, 0.70)]
    assert convergence(plateau, plateau)["ratio"] == 1.0  # a run against itself
    assert convergence(plateau, plateau)["reference_step"] == 200
    broken = convergence(plateau, [(100, 0.9), (200, float("nan"))])
    assert broken["ratio"] is None and broken["reason"] == (
        "the random run's final validation masked MSE is nan")


def test_the_report_notes_a_random_run_whose_error_rose_after_its_final_level(tmp_path):
    """random's validation error 0.95 at 50, 1.02 at 100: its final level was reached at step
    50; cv ends lower (0.96) but reaches 1.02 at 100, so its ratio 2.0 reads slower."""
    paths = [make_run(tmp_path, "random", 0, [1.0] * 4, curve=((50, 0.95), (100, 1.02))),
             make_run(tmp_path, "cv", 0, [0.9] * 4, curve=((50, 1.04), (100, 0.96)))]
    summary = summarize_paths(paths)
    details = summary["strategies"]["cv"]["vs_random"]["convergence"]["details"]["0"]
    assert (details["ratio"], details["reference_step"], details["reference_final_step"]) == (
        2.0, 50, 100)
    text = "\n".join(report_lines(summary, []))
    assert ("Random's validation error rose after reaching its final level (seed 0: step 50 "
            "of 100): there a convergence ratio counts the steps") in text
    paths[0] = make_run(tmp_path / "falling", "random", 0, [1.0] * 4,
                        curve=((50, 1.05), (100, 1.02)))
    assert "rose after" not in "\n".join(report_lines(summarize_paths(paths), []))


def test_convergence_reads_validation_lines_and_keeps_the_last_of_a_repeated_step(tmp_path):
    ref = make_run(tmp_path, "random", 0, [1.0] * 4, curve=((100, 1.0), (200, 0.7)))
    cv = make_run(tmp_path, "cv", 0, [1.0] * 4, curve=((100, 0.9), (200, 0.6)))
    with open(os.path.join(cv, "metrics.jsonl"), "a") as f:  # resumed: step 100 logged again
        f.write(json.dumps({"step": 100, "split": "tuning", "masked_mse": 0.65}) + "\n")
    conv = summarize_paths((ref, cv))[
        "strategies"]["cv"]["vs_random"]["convergence"]
    assert conv["details"]["0"]["ratio"] == 0.5
    assert (conv["median"], conv["n_reached"], conv["n"]) == (0.5, 1, 1)


@pytest.mark.parametrize("cv_curves, median, cell", [
    ([((100, 0.6), (200, 0.6)), ((100, 0.9), (200, 0.8))], None,
     "not reached (1/2 seeds reach it)"),
    ([((100, 0.6), (200, 0.6)), ((100, 0.9), (200, 0.6)), ((100, 0.9), (200, 0.8))], 1.0,
     "1.00 (2/3 seeds reach it)"),
])
def test_convergence_pools_seeds_that_never_reach_the_target_as_slowest(tmp_path, cv_curves,
                                                                        median, cell):
    """The median counts a seed that never reaches random's final MSE as the slowest, instead
    of averaging over the seeds that do (which reported 0.50 for the first case)."""
    paths = []
    for seed, curve in enumerate(cv_curves):
        paths.append(make_run(tmp_path, "random", seed, [1.0] * 4,
                              curve=((100, 1.0), (200, 0.7))))
        paths.append(make_run(tmp_path, "cv", seed, [1.0] * 4, curve=curve))
    summary = summarize_paths(paths)
    assert summary["strategies"]["cv"]["vs_random"]["convergence"]["median"] == median
    assert f"| {cell} |" in "\n".join(report_lines(summary, []))
    assert summary["seed_noise_floor"]["convergence_ratio"] == 1.0


def test_single_code_and_perturbation_are_used_when_present(tmp_path):
    def extra(ratio, single):
        return dict(single_code=dict(per_code=[dict(code=c, name=NAMES[c], num_masked=10,
                                                    mse=m)
                                               for c, m in zip(CODES, single)]),
                    perturbation=dict(seed=0, split="held_out", shuffle_within_code=dict(
                        reconstruction=dict(masked_mse_clean=1.0, masked_mse_corrupted=ratio,
                                            ratio=ratio), downstream={})))

    ref = make_run(tmp_path, "random", 0, [1.0] * 4, **extra(1.1, [1.0] * 4))
    cv = make_run(tmp_path, "cv", 0, [1.0] * 4, **extra(1.4, [0.5, 0.5, 0.5, 2.0]))
    var = make_run(tmp_path, "variance", 0, [1.0] * 4)  # evaluated without either block
    strategies = summarize_paths((ref, cv, var))["strategies"]
    single = strategies["cv"]["vs_random"]["reconstruction"]["single_code"]
    assert single["pooled"]["win_rate"] == 0.75
    assert strategies["cv"]["perturbation"]["shuffle_within_code"]["mean"] == 1.4
    assert strategies["random"]["perturbation"]["shuffle_within_code"]["mean"] == 1.1
    assert "no single_code" in strategies["variance"]["vs_random"]["reconstruction"][
        "single_code"]["note"]
    assert strategies["variance"]["perturbation"] == {}


def test_each_strategy_is_set_beside_carry_forward_aggregates_and_scratch(tmp_path):
    rng = np.random.default_rng(5)
    labels, a = binormal(300, 0.5, rng)
    _, b = binormal(300, 1.0, rng, labels)
    locf = (0.9, 0.9, 0.9, 0.9)

    def outcome(probe_minus_lr, finetuned, scratch):
        return dict(aggregates=dict(
            reason=None, logistic_regression=dict(auroc=0.70, probe_minus_model=dict(
                delta=probe_minus_lr)),
            gradient_boosting=dict(auroc=0.75, probe_minus_model=dict(delta=-0.1)),
            probe_plus_aggregates=dict(aggregates_model="gradient_boosting",
                                       auroc=0.70 + probe_minus_lr,
                                       minus_model=dict(delta=probe_minus_lr - 0.05))),
            finetune=dict(pretrained=dict(auroc=finetuned, n=300), scratch=dict(auroc=scratch),
                          pretrained_vs_scratch=dict(delta=finetuned - scratch)))

    runs = [make_run(tmp_path, "random", 0, [1.0, 0.8, 0.8, 1.0], locf_mses=locf,
                     task_scores={"death": (labels, a)}, finetuned_scores={"death": (labels, a)},
                     task_extra=outcome(0.02, 0.80, 0.60)),
            make_run(tmp_path, "random", 1, [1.0, 1.0, 1.0, 1.0], locf_mses=locf,
                     task_scores={"death": (labels, a)}, finetuned_scores={"death": (labels, a)},
                     task_extra=outcome(0.04, 0.82, 0.64)),
            make_run(tmp_path, "cv", 0, [0.5, 0.5, 0.5, 1.0], locf_mses=locf,
                     task_scores={"death": (labels, a)}, finetuned_scores={"death": (labels, b)},
                     task_extra=outcome(0.06, 0.90, 0.10)),  # its own scratch: unused
            make_run(tmp_path, "cv", 1, [0.5, 0.5, 0.5, 0.5], locf_mses=locf,
                     task_scores={"death": (labels, a)}, finetuned_scores={"death": (labels, b)},
                     task_extra=outcome(0.08, 0.92, 0.10))]
    summary = summarize_paths(runs)
    simple = summary["simple_methods"]
    recon = simple["reconstruction"]
    assert recon["random"]["labs_beating_locf"]["per_seed"] == {"0": 0.5, "1": 0.0}
    assert recon["cv"]["labs_beating_locf"]["mean"] == pytest.approx(0.875)
    assert recon["cv"]["mse_vs_locf"]["mean"] == pytest.approx((0.625 + 0.5) / 2 / 0.9)
    death = simple["downstream"]["death"]
    assert death["aggregates"]["logistic_regression"]["mean"] == pytest.approx(0.70)
    assert death["scratch"]["mean"] == pytest.approx(0.62)
    cv = death["strategies"]["cv"]
    assert cv["probe_minus"]["logistic_regression"]["mean"] == pytest.approx(0.07)
    assert cv["together"]["mean"] == pytest.approx(0.77)
    assert cv["together_minus_model"]["per_seed"] == pytest.approx({"0": 0.01, "1": 0.03})
    assert cv["finetuned"]["mean"] == pytest.approx(0.91)
    assert cv["finetuned_minus_scratch"]["mean"] == pytest.approx(0.29)
    delta = summary["strategies"]["cv"]["vs_random"]["finetuned_auroc_delta"]["death"]
    assert delta["delta"] == pytest.approx(roc_auc_score(labels, b) - roc_auc_score(labels, a))
    assert delta["ci"][0] < delta["delta"] < delta["ci"][1]
    report = "\n".join(report_lines(summary, []))
    assert "## Beside the simple methods" in report
    assert "| `cv` | 0.562 (0.500 to 0.625) | 0.625 (0.556 to 0.694) | 0.88 (0.75 to 1.00) |" \
        in report
    assert "- from scratch (no pretraining): 0.620 (0.600 to 0.640)" in report
    assert "| `cv` | " in report and "+0.070 (+0.060 to +0.080)" in report
    assert ("| 0.770 (0.760 to 0.780) | +0.020 (+0.010 to +0.030) | 0.910 (0.900 to 0.920) |"
            in report)  # probe + aggregates, minus the aggregates model, fine-tuned
    assert "fine-tuned AUROC death: Δ vs random [95% CI]" in report
    assert f"(Δ {delta['delta']:+.3f} [{delta['ci'][0]:+.3f}, {delta['ci'][1]:+.3f}]; " \
        "n = " in report
    seed0 = delta["per_seed"]["0"]
    assert f"| {seed0['delta']:+.3f} [{seed0['ci'][0]:+.3f}, {seed0['ci'][1]:+.3f}] |" in report


def test_compare_runs_writes_summary_report_and_plots_without_subject_ids(tmp_path):
    rng = np.random.default_rng(3)
    labels, a = binormal(300, 0.5, rng)
    runs = [make_run(tmp_path / "runs", s, seed, [1.0, 0.9, 1.1, 1.0], task_scores={
        "death": (labels, a + 0.1 * rng.standard_normal(300))},
        label_efficiency={"16": 0.5 + 0.1 * seed, "all": 0.7}, cv_threshold=0.25)
        for s in ("cv", "random") for seed in (0, 1)]
    summary = compare.compare_runs(runs, str(tmp_path / "out"))
    for name in ("summary.json", "report.md", "validation_curves.png",
                 "lab_difference_by_cv.png", "auroc_by_task.png"):
        assert (tmp_path / "out" / name).exists(), name
    assert list(summary["strategies"]) == ["random", "cv"]
    report = (tmp_path / "out" / "report.md").read_text()
    assert "| `cv` | 0,1 |" in report and "win rate vs random" in report
    assert "**Seed noise floor**: `random` seed 1 vs `random` seed 0" in report
    assert "AUROC death: Δ vs random [95% CI]" in report
    assert summary["strategies"]["cv"]["label_efficiency"]["death"]["16"]["mean"] == 0.55
    assert "| death | `cv` | 0.550 | 0.700 |" in report
    for text in (report, (tmp_path / "out" / "summary.json").read_text()):
        assert str(SUBJECT_BASE)[:6] not in text


@pytest.mark.parametrize("strategies_seeds, message", [
    ((("cv", 0), ("variance", 0)), "no 'random' run among --compare"),
    ((("random", 0), ("cv", 1)), "has no random run with seed 1"),
])
def test_unpairable_runs_are_refused(tmp_path, strategies_seeds, message):
    runs = [load_run(make_run(tmp_path, s, seed, [1.0] * 4))
            for s, seed in strategies_seeds]
    with pytest.raises(ValueError, match=message):
        group_runs(runs)


def test_runs_whose_probes_read_different_vectors_are_refused(tmp_path):
    ref = make_run(tmp_path, "random", 0, [1.0] * 4)  # no eval_settings: the defaults
    same = make_run(tmp_path, "cv", 0, [1.0] * 4,
                    eval_settings=dict(pooling="mean", label_window="last_events"))
    group_runs([load_run(ref), load_run(same)])
    other = make_run(tmp_path, "variance", 0, [1.0] * 4,
                     eval_settings=dict(label_window="each_code_latest"))
    with pytest.raises(ValueError, match="different config.eval.label_window, so their probes "
                                         "read different vectors: .*'each_code_latest'"):
        group_runs([load_run(ref), load_run(same), load_run(other)])


def test_runs_whose_models_were_fine_tuned_differently_are_refused(tmp_path):
    """Among runs with fine-tuned models the settings must agree (a record without head_init:
    its default, zero); runs without fine-tuning do not count."""
    ref = make_run(tmp_path, "random", 0, [1.0] * 4, finetune_settings=dict(steps=600))
    same = make_run(tmp_path, "cv", 0, [1.0] * 4,
                    finetune_settings=dict(steps=600, head_init="zero"))
    untuned = make_run(tmp_path, "cv_rank", 0, [1.0] * 4)
    group_runs([load_run(p) for p in (ref, same, untuned)])
    other = make_run(tmp_path, "variance", 0, [1.0] * 4,
                     finetune_settings=dict(steps=600, head_init="probe"))
    with pytest.raises(ValueError, match="different config.eval.finetune.head_init, so their "
                                         "fine-tuned models were trained differently: "
                                         ".*'probe'"):
        group_runs([load_run(p) for p in (ref, same, other)])


def test_runs_evaluated_on_different_data_or_label_rows_are_refused(tmp_path):
    """The prepared dataset: metrics.json's record, else the training one (data_stats.json);
    label rows: every run's held_out predictions must hold the same rows."""
    rng = np.random.default_rng(0)
    labels, scores = binormal(60, 1.0, rng)
    ref = make_run(tmp_path, "random", 0, [1.0] * 4, task_scores={"death": (labels, scores)},
                   dataset="chunks256_aaa")
    same = make_run(tmp_path, "cv", 0, [1.0] * 4, task_scores={"death": (labels, scores)})
    (tmp_path / "cv_s0" / "data_stats.json").write_text(json.dumps({"dataset": "chunks256_aaa"}))
    summarize_paths([ref, same])
    other = make_run(tmp_path, "variance", 0, [1.0] * 4, dataset="chunks256_bbb")
    with pytest.raises(ValueError, match="different data .*cannot be paired: .*chunks256_aaa; "
                                         ".*variance_s0: prepared dataset chunks256_bbb"):
        group_runs([load_run(p) for p in (ref, same, other)])
    fewer = make_run(tmp_path, "cv_rank", 0, [1.0] * 4,
                     task_scores={"death": (labels[:50], scores[:50])}, dataset="chunks256_aaa")
    with pytest.raises(ValueError, match="task death: the runs' held_out label rows differ "
                                         r"\(50 shared; random_s0 has 10 others, cv_s0 has 10 "
                                         r"others\); evaluate them with the same "
                                         "config.eval.labels_dir"):
        summarize_paths([ref, same, fewer])


def run_eval_cli(*args):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, os.path.join(REPO, "eval.py"), *args], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=300)


def test_cli_compare_writes_the_report_and_refuses_unusable_runs(tmp_path):
    ref = make_run(tmp_path, "random", 0, [1.0] * 4)
    cv = make_run(tmp_path, "cv", 0, [0.9] * 4)
    os.makedirs(tmp_path / "bare")
    result = run_eval_cli(f"--compare={ref},{tmp_path / 'bare'}", f"--workdir={tmp_path}/out")
    assert result.returncode == 1
    assert (f"error: {tmp_path / 'bare'}: no eval/metrics.json; run `python eval.py "
            f"--workdir={tmp_path / 'bare'}` first") in result.stderr
    assert "Traceback" not in result.stderr
    result = run_eval_cli(f"--compare={cv}", f"--workdir={tmp_path}/out")
    assert result.returncode == 1 and "no 'random' run among --compare" in result.stderr
    result = run_eval_cli(f"--compare={ref},{cv}", "--step=5", f"--workdir={tmp_path}/out")
    assert result.returncode == 1 and "takes no --config.<field> overrides or --step" in \
        result.stderr
    assert not (tmp_path / "out").exists()
    result = run_eval_cli(f"--compare={ref},{cv}", f"--workdir={tmp_path}/out")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "| `cv` | 0 |" in (tmp_path / "out" / "report.md").read_text()


def test_codes_without_variation_are_left_out_of_the_lab_comparison(tmp_path):
    """A constant code has baseline MSE 0 and errors ~0 for every model: its sign is noise."""
    ref = make_run(tmp_path, "random", 0, [1.0, 1.0, 1.0, 2e-6])
    cv = make_run(tmp_path, "cv", 0, [0.9, 0.9, 0.9, 1e-6])
    for path in (ref, cv):
        metrics_path = os.path.join(path, "eval", "metrics.json")
        metrics = json.load(open(metrics_path))
        metrics["per_code"][3]["baseline_mse"] = 0.0  # LAB//D: one value on held_out
        json.dump(metrics, open(metrics_path, "w"))
    lab = summarize_paths((ref, cv))["strategies"]["cv"]["vs_random"]["reconstruction"][
        "uniform"]["pooled"]
    assert lab["n_labs"] == 3 and lab["win_rate"] == 1.0


def test_report_and_lab_plot_name_the_labs(tmp_path):
    from unittest import mock

    from cvmae_jax.evaluation import compare_plots

    paths = (make_run(tmp_path, "random", 0, [1.0] * 4),
             make_run(tmp_path, "cv", 0, [0.8, 0.9, 0.7, 1.2]))
    groups = group_runs([load_run(p) for p in paths])
    summary = summarize_runs(groups)
    report = "\n".join(report_lines(summary, []))
    assert "| lab | code | train CV | Δ `cv` |" in report
    assert "| Albumin [g/dL] | `LAB//A` | 0.100 | +0.2000 |" in report
    assert "| B \\| with a pipe | `LAB//B` | 0.200 | +0.1000 |" in report
    assert "| LAB//C | `LAB//C` | 0.300 | +0.3000 |" in report  # no description: the code
    with mock.patch.object(compare_plots, "save_figure") as save:
        compare_plots.plot_all(groups, summary, str(tmp_path))
    (fig,) = [c.args[0] for c in save.call_args_list if c.args[1].endswith("by_cv.png")]
    ticks = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    assert ticks == [NAMES[c] for c in CODES]


def test_study_tables_are_dataframes(tmp_path):
    import pandas as pd

    from cvmae_jax.evaluation import results

    labels, scores = binormal(200, 1.0, np.random.default_rng(0))
    paths = [make_run(tmp_path / "runs", s, 0, mses, task_scores={"death": (labels, scores)})
             for s, mses in (("random", [1.0] * 4), ("cv", [0.8, 0.9, 0.7, 1.2]))]
    summary = compare.compare_runs(paths, str(tmp_path / "out"))
    table = results.study_table(str(tmp_path / "out"))
    assert table.equals(results.study_table(summary))
    assert list(table.index) == ["random", "cv"]
    assert table.loc["cv", "death_auroc"] == pytest.approx(roc_auc_score(labels, scores))
    assert table.loc["cv", "death_auroc_delta"] == 0.0  # the same predictions
    assert table.loc["cv", "death_auroc_delta_ci_low"] == 0.0
    assert table.loc["cv", "win_rate"] == 0.75 and table.loc["cv", "n_labs"] == 4
    assert np.isnan(table.loc["random", "win_rate"]) and table.loc["cv", "seeds"] == [0]
    assert pd.isna(table.loc["random", "n_labs"]) and table["n_labs"].dtype == "Int64"
    labs = results.study_lab_table(str(tmp_path / "out"))
    assert list(labs["name"]) == [NAMES[c] for c in CODES]
    np.testing.assert_allclose(labs["diff"], [0.2, 0.1, 0.3, -0.2])


def test_lab_plot_hatches_each_two_tier_strategys_own_high_tier(tmp_path):
    """cv_within's high tier is not the right of the train-CV line: its own labs are marked."""
    from unittest import mock

    from cvmae_jax.evaluation import compare_plots

    paths = [make_run(tmp_path, "random", 0, [1.0] * 4)]
    for strategy, probs in (("cv_within", [0.8, 0.2, 0.2, 0.8]),
                            ("cv_rank", [0.1, 0.3, 0.5, 0.7])):
        paths.append(make_run(tmp_path, strategy, 0, [0.8, 0.9, 0.7, 1.2]))
        metrics_path = os.path.join(paths[-1], "eval", "metrics.json")
        metrics = json.load(open(metrics_path))
        for row, p in zip(metrics["per_code"], probs):
            row["train_mask_prob"] = p
        json.dump(metrics, open(metrics_path, "w"))
    groups = group_runs([load_run(p) for p in paths])
    with mock.patch.object(compare_plots, "save_figure") as save:
        compare_plots.plot_all(groups, summarize_runs(groups), str(tmp_path))
    (fig,) = [c.args[0] for c in save.call_args_list if c.args[1].endswith("by_cv.png")]
    hatches = {ax.get_title().split()[0]: [bar.get_hatch() or "" for bar in ax.patches]
               for ax in fig.axes}
    assert hatches == {"cv_within": ["///", "", "", "///"], "cv_rank": ["", "", "", ""]}
    legends = {ax.get_title().split()[0]: [t.get_text() for t in ax.get_legend().get_texts()]
               for ax in fig.axes}
    assert "masked at 0.8 in training (cv_within's high tier)" in legends["cv_within"]
    assert len(legends["cv_rank"]) == 1  # the train-CV line only
