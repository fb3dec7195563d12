"""The report's "Does pretraining earn its keep?" section from hand-made metrics."""

from cvmae_jax.evaluation.yardstick import yardstick_lines


def _model(auroc, delta, ci):
    return dict(auroc=auroc, auroc_ci=[auroc - 0.05, auroc + 0.05],
                probe_minus_model=dict(delta=delta, ci=ci, bootstrap_used=1000))


def test_yardstick_shows_reconstruction_and_task_rows():
    result = dict(
        overall=dict(num_masked=300, masked_mse=0.6, baseline_masked_mse=0.8,
                     mse_vs_baseline=0.75, locf_masked_mse=0.5, mse_vs_locf=1.2,
                     locf_fallback_share=0.25),
        per_code=[dict(num_masked=100, mse=0.4, locf_mse=0.5), dict(num_masked=200, mse=0.7,
                                                                    locf_mse=0.5),
                  dict(suppressed=True)],
        downstream=dict(tasks=dict(
            mortality=dict(n=50, auroc=0.7, auroc_ci=[0.6, 0.8], aggregates=dict(
                reason=None, features=dict(windows_at_max_len=dict(train=3, held_out=1)),
                logistic_regression=_model(0.8, -0.1, [-0.18, -0.02]),
                gradient_boosting=_model(0.72, -0.02, [-0.1, 0.06]),
                probe_plus_aggregates=dict(
                    aggregates_model="logistic_regression", auroc=0.83, auroc_ci=[0.75, 0.9],
                    minus_model=dict(delta=0.03, ci=[0.01, 0.05]),
                    minus_probe=dict(delta=0.13, ci=[0.05, 0.2])))),
            readmission=dict(n=40, auroc=None, aggregates=dict(reason="as for the probe: x")))))
    text = "\n".join(yardstick_lines(result))
    assert "| per-code mean | 0.8000 | 0.750 |" in text
    assert "| carry-forward (LOCF) | 0.5000 | 1.200 |" in text and "(25.0% of the hidden values)" in text
    assert "beats carry-forward on 1 of the 2 labs" in text
    assert ("| mortality | 50 | 0.700 [0.600, 0.800] | 0.800 [0.750, 0.850] | "
            "-0.100 [-0.180, -0.020] aggregates better | 0.720 [0.670, 0.770] | "
            "-0.020 [-0.100, +0.060] no clear difference |") in text
    assert ("- mortality: 4 label windows are full; their older events are seen by neither the "
            "probe nor the aggregates (config.eval.label_max_len reads longer windows; "
            "config.eval.label_window=each_code_latest keeps every code's latest event)") in text
    result["eval_settings"] = dict(label_window="each_code_latest")
    assert ("- mortality: 4 label windows are full; their older events other than each code's "
            "latest are seen by neither the probe nor the aggregates (config.eval.label_max_len "
            "reads longer windows)") in "\n".join(yardstick_lines(result))
    assert "- readmission: no comparison (as for the probe: x)" in text
    assert ("| mortality | 0.830 [0.750, 0.900] | aggregates LR | +0.030 [+0.010, +0.050] "
            "together better | +0.130 [+0.050, +0.200] together better |") in text
    assert text.count("| readmission |") == 0  # no comparison: no rows
    assert "has no prediction export" not in text
    together = result["downstream"]["tasks"]["mortality"]["aggregates"]["probe_plus_aggregates"]
    together["calibration"] = dict(reason="tuning split has one class or no rows")
    assert ("- mortality: probe + aggregates has no prediction export (its sum of log-odds has "
            "no probabilities: tuning split has one class or no rows)"
            in "\n".join(yardstick_lines(result)))
