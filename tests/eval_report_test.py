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
