"""eval's report.md and reconstruction_by_lab.png name the labs (metrics rows -> text, figure)."""

from unittest import mock

from cvmae_jax.evaluation import report

LONG = "Creatinine [Blood, Chemistry] (hosp labevents itemid 50912); unit mg/dL"


def _result():
    rows = [dict(code="LAB//50912//mg/dL", name=LONG, cv=0.5),
            dict(code="LAB//50983//mEq/L", name="Sodium [mEq/L]", cv=0.02),
            dict(code="LAB//X//UNK", name="LAB//X//UNK", cv=0.3)]  # no description
    for r in rows:
        r.update(num_masked=10, mse=0.5, baseline_mse=1.0, train_mask_prob=0.3, raw_rmse=1.0,
                 locf_mse=0.8, locf_fallback_share=0.5)
    overall = dict(num_masked=30, masked_mse=0.5, baseline_masked_mse=1.0, mse_vs_baseline=0.5,
                   locf_masked_mse=0.8, mse_vs_locf=0.625, locf_fallback_share=0.5)
    tier = dict(num_codes=1, num_masked=10, masked_mse=0.5, baseline_masked_mse=1.0,
                mse_vs_baseline=0.5)
    return dict(per_code=rows, overall=overall, by_cv_tier=dict(high_cv=tier, low_cv=tier),
                split="held_out", step=3, strategy="cv", cv_threshold=0.4,
                eval_mask=dict(rate=0.3, seed=0),
                code_selection="pattern '^LAB//', 3 codes (LAB 3)")


def test_report_tables_name_each_lab_beside_its_code(tmp_path):
    report.write_report(str(tmp_path / "report.md"), _result())
    text = (tmp_path / "report.md").read_text()
    assert "Codes: pattern '^LAB//', 3 codes (LAB 3)." in text
    assert "| lab | code | train CV |" in text
    assert "| Sodium [mEq/L] | `LAB//50983//mEq/L` | 0.020 |" in text
    assert f"| {LONG} | `LAB//50912//mg/dL` | 0.500 |" in text
    assert "| LAB//X//UNK | `LAB//X//UNK` | 0.300 |" in text
    assert "| baseline MSE | LOCF MSE | LOCF fallback |" in text
    assert "| 0.5000 | 1.0000 | 0.8000 | 50% |" in text  # model, mean and carry-forward


def test_plot_ticks_are_the_lab_names(tmp_path):
    with mock.patch.object(report, "save_figure") as save:
        report.plot_by_lab(str(tmp_path / "by_lab.png"), _result())
    ticks = [t.get_text() for t in save.call_args.args[0].axes[0].get_xticklabels()]
    assert ticks == ["Sodium [mEq/L]", "LAB//X//UNK", "Creatinine [Blood, Chemistr… [mg/dL]"]


def test_report_rows_put_each_number_in_its_column():
    tier = dict(num_codes=1, num_masked=10, masked_mse=0.5, baseline_masked_mse=1.0,
                mse_vs_baseline=0.5)
    assert "| high_cv | 1 | 10 | 0.5000 | 1.0000 | 0.500 |" in report._tier_table(
        dict(high_cv=tier))
    kind = dict(reconstruction=dict(num_masked=30, masked_mse_clean=0.5,
                                    masked_mse_corrupted=0.9, ratio=1.8), downstream={})
    perturbation = dict(seed=0, split="held_out", n=40, downstream_split="held_out",
                        kinds=["code_mean"], code_mean=kind)
    assert any(line.startswith("| code_mean | 30 | 0.5000 | 0.9000 |")
               for line in report._perturbation_lines(perturbation))
    scores = dict(samples_equally_weighted=dict(
        roc_auc_score=0.8, average_precision_score=0.4, brier_score=0.1, calibration_error=0.05))
    assert "| death | probe | 0.800 | 0.400 | 0.100 | 0.050 |" in report._scored_lines(
        dict(death=dict(held_out=scores)), {})
    entry = dict(auroc_mean=0.7, auroc_std=0.05, C=0.1, n_train=16, draws=5, n_test=150)
    downstream = dict(seed=0, tasks=dict(death=dict(label_efficiency={"16": entry, "all": dict(
        entry, n_train=200, draws=1, auroc_std=None)})), label_efficiency=dict(
        split="held_out", c_policy="C of the full probe", draws=5, seed=0, ks=[16]))
    assert "| death | 16 | 16 | 5 | 150 | 0.1 | 0.700 | 0.050 |" in (
        report._label_efficiency_lines(downstream))
