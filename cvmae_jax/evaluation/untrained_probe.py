"""The frozen probe's control: the same probe on the network before pretraining.

The label windows are encoded by the network at its initial parameters (the ones pretraining
started from: same config, same seed), pooled as the probe's, and the probe is fit again (C by
tuning AUROC). What the pretrained probe gains over it is what pretraining added to the frozen
vectors; the rest comes from the architecture and the pooling (a random network's per-code
averages already carry each lab's values). Reported with the paired subject-bootstrap CI of the
difference, pretrained - untrained.
"""

from __future__ import annotations

from cvmae_jax.evaluation.downstream import (TEST, TRAIN, TUNING, TaskData, embed_label_windows,
                                             fit_task_probe)
from cvmae_jax.evaluation.paired_stats import SubjectBootstrap, paired_auroc_difference


def untrained_probe(graphdef, initial_params, data: TaskData, probe_result: dict, max_len: int,
                    batch_size: int, embed_fn, seed: int = 0) -> dict:
    """The untrained network's probe result (as ``probe_task``'s) plus
    ``probe_minus_untrained`` ({delta, ci, bootstrap_used}: pretrained - untrained held_out
    AUROC); when the pretrained probe has no held_out AUROC, only ``reason``."""
    if probe_result.get("auroc") is None or data.probe is None:
        return dict(reason=f"as for the probe: {probe_result.get('reason')}")
    x = {split: embed_label_windows(graphdef, initial_params, windows, max_len, batch_size,
                                    embed_fn)
         for split, windows in data.windows.items()}
    subjects = [int(w["subject_id"]) for w in data.windows[TEST]]
    result, probe = fit_task_probe(x[TRAIN], data.y[TRAIN], x[TUNING], data.y[TUNING], x[TEST],
                                   data.y[TEST], seed, subjects)
    result["probe_minus_untrained"] = paired_auroc_difference(
        data.y[TEST], data.probe.decision(data.x[TEST]), probe.decision(x[TEST]),
        SubjectBootstrap(subjects, seed))
    return result
