"""The "simple_methods" block of the study's summary.json: every strategy's runs beside the
methods a practitioner would use instead, on the same rows: carry-forward and per-code means
for reconstruction; the aggregates baseline, the probe on the untrained network and the same
network trained from scratch on the label for each task. Means over seeds with every seed's
value."""

from __future__ import annotations

from cvmae_jax.evaluation.aggregates import MODELS as AGGREGATE_MODELS
from cvmae_jax.evaluation.compared_runs import REFERENCE, Run, over_seeds
from cvmae_jax.evaluation.paired_predictions import task_result
from cvmae_jax.evaluation.yardstick import labs_beating_locf


def simple_methods(groups: dict[str, dict[int, Run]], tasks: list[str]) -> dict:
    """{"reconstruction": {strategy: ratios and carry-forward win share}, "downstream": {task:
    aggregates, untrained-network probe and scratch AUROCs (the reference's seeds: none depends
    on the strategy) and
    per strategy the probe, probe + aggregates and fine-tuned AUROCs with their paired
    differences}}."""
    reconstruction = {s: _reconstruction(by_seed) for s, by_seed in groups.items()}
    downstream = {}
    for task in tasks:
        reference = groups[REFERENCE]
        downstream[task] = dict(
            aggregates={m: over_seeds({
                s: _probe_block(r, task, "aggregates").get(m, {}).get("auroc")
                for s, r in reference.items()})
                        for m in AGGREGATE_MODELS if _has_aggregates(reference, task)},
            untrained=over_seeds({s: _probe_block(r, task, "untrained").get("auroc")
                                  for s, r in reference.items()}),
            scratch=over_seeds({s: _scratch_auroc(r, task) for s, r in reference.items()}),
            strategies={s: _downstream(by_seed, reference, task) for s, by_seed in groups.items()})
    return dict(reconstruction=reconstruction, downstream=downstream)


def _reconstruction(by_seed: dict[int, Run]) -> dict:
    shares = {}
    for s, run in by_seed.items():
        wins, labs = labs_beating_locf(run.metrics)
        shares[s] = wins / labs if labs else None
    overall = {s: r.metrics["overall"] for s, r in by_seed.items()}
    return dict(mse_vs_mean=over_seeds({s: o.get("mse_vs_baseline") for s, o in overall.items()}),
                mse_vs_locf=over_seeds({s: o.get("mse_vs_locf") for s, o in overall.items()}),
                labs_beating_locf=over_seeds(shares))


def _downstream(by_seed: dict[int, Run], reference: dict[int, Run], task: str) -> dict:
    """The strategy's probe, probe + aggregates and fine-tuned AUROCs; probe + aggregates minus
    its aggregates model; fine-tuned minus the scratch model of the reference run with the same
    seed (the study trains the scratch model there only)."""
    aggregates = {s: _probe_block(r, task, "aggregates") for s, r in by_seed.items()}
    finetuned = {s: task_result(r, task, "finetuned").get("auroc") for s, r in by_seed.items()}
    scratch = {s: _scratch_auroc(reference[s], task) if s in reference else None
               for s in by_seed}
    return dict(
        probe=over_seeds({s: task_result(r, task, "probe").get("auroc")
                          for s, r in by_seed.items()}),
        probe_minus={m: over_seeds({s: a.get(m, {}).get("probe_minus_model", {}).get("delta")
                                    for s, a in aggregates.items()})
                     for m in AGGREGATE_MODELS},
        probe_minus_untrained=over_seeds({
            s: _probe_block(r, task, "untrained").get("probe_minus_untrained", {}).get("delta")
            for s, r in by_seed.items()}),
        together=over_seeds({s: a.get("probe_plus_aggregates", {}).get("auroc")
                             for s, a in aggregates.items()}),
        together_minus_model=over_seeds({
            s: a.get("probe_plus_aggregates", {}).get("minus_model", {}).get("delta")
            for s, a in aggregates.items()}),
        finetuned=over_seeds(finetuned),
        finetuned_minus_scratch=over_seeds({
            s: None if None in (finetuned[s], scratch[s]) else finetuned[s] - scratch[s]
            for s in by_seed}))


def _probe_block(run: Run, task: str, name: str) -> dict:
    """The block ``name`` ("aggregates", "untrained") beside the run's probe of ``task``; {}
    when eval.py wrote none or only the reason it could not."""
    block = task_result(run, task, "probe").get(name) or {}
    return {} if block.get("reason") else block


def _has_aggregates(by_seed: dict[int, Run], task: str) -> bool:
    return any(_probe_block(r, task, "aggregates") for r in by_seed.values())


def _scratch_auroc(run: Run, task: str) -> float | None:
    """The held_out AUROC of the run's from-scratch classifier (None when it trained none)."""
    finetune = task_result(run, task, "probe").get("finetune") or {}
    return finetune.get("scratch", {}).get("auroc")
