"""The "Fine-tuning" section of ``eval/report.md`` (``cvmae_jax.evaluation.finetune``'s
results) and its k-shot lines on the label-efficiency plot."""

from __future__ import annotations

from cvmae_jax.evaluation.finetune import MODELS
from cvmae_jax.pooling import DESCRIPTIONS


def _cell(value, ci=None) -> str:
    if value is None:
        return "n/a"
    return f"{value:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")


def _delta_cell(d: dict | None) -> str:
    if not d or d.get("delta") is None:
        return "n/a"
    return f"{d['delta']:+.3f}" + (f" [{d['ci'][0]:+.3f}, {d['ci'][1]:+.3f}]" if d["ci"] else "")


def finetune_lines(downstream: dict) -> list[str]:
    """Markdown: per task, held_out AUROC/AUPRC of the probe, the fine-tuned and the scratch
    classifier, the paired AUROC differences, and the fine-tuned k-shot points."""
    settings = downstream.get("finetune")
    if not settings:
        return []
    s = settings
    pooling = s["pooling"]
    init = ("`pretrained`'s head starts at the probe's weights and is checked before the first "
            "step (linear probing, then fine-tuning), `scratch`'s at zero weight. Both: the same "
            if s.get("head_init") == "probe" else "Both: the same head initialization, ")
    lines = ["", f"## Fine-tuning on `{s['split']}`", "",
             f"The encoder plus a {s['head']} head on {DESCRIPTIONS[pooling]} (`{pooling}`, as "
             "the probe) in the probe's label windows, trained with binary cross-entropy on "
             "train, every weight updated: `pretrained` starts from this run's encoder (its "
             f"learning rate {s['encoder_lr_scale']:g}x the head's), `scratch` from a random "
             f"one (the same rate as the head). {init}batches and "
             f"budget (at most {s['steps']} steps of {s['batch_size']} rows, peak rate "
             f"{s['learning_rate']:g}); "
             f"tuning AUROC every {s['eval_every']} steps, the best kept, stop after "
             f"{s['patience']} checks without a better one. 95% CIs from {s['num_bootstrap']} "
             "bootstrap resamples of held_out's subjects; the differences are paired (the same "
             f"resamples for both models). {s['launcher']} over {s['devices']} device(s). "
             "Predictions: " + ", ".join(f"`predictions_{m}/`" for m in s["models"]) + "."
             + ("" if "scratch" in s["models"] else " No scratch model here "
                "(config.eval.finetune.scratch=False)."), "",
             "| task | model | AUROC [95% CI] | AUPRC [95% CI] | best step / steps run | "
             "tuning AUROC |", "|---|---|---|---|---|---:|"]
    deltas, notes, kshot = [], [], []
    for task, r in downstream["tasks"].items():
        f = r.get("finetune")
        if f is None:
            continue
        if f.get("reason"):
            notes.append(f"- {task}: not fine-tuned ({f['reason']})")
            continue
        lines.append(f"| {task} | probe | {_cell(r.get('auroc'), r.get('auroc_ci'))} | "
                     f"{_cell(r.get('auprc'), r.get('auprc_ci'))} | | "
                     f"{_cell(r.get('tuning_auroc'))} |")
        for model in (m for m in MODELS if m in f):
            m = f[model]
            lines.append(f"| {task} | {model} | {_cell(m['auroc'], m['auroc_ci'])} | "
                         f"{_cell(m['auprc'], m['auprc_ci'])} | {m['best_step']} / "
                         f"{m['steps_run']} | {_cell(m['tuning_auroc'])} |")
        if f["pretrained"]["reason"]:
            notes.append(f"- {task}: no held_out AUROC ({f['pretrained']['reason']})")
        deltas.append(f"| {task} | {_delta_cell(f.get('pretrained_vs_scratch'))} | "
                      f"{_delta_cell(f.get('pretrained_vs_probe'))} |")
        for k, e in (f.get("label_efficiency") or {}).items():
            probe = (r.get("label_efficiency") or {}).get(k, {})
            kshot.append(f"| {task} | {k} | {e['draws']} | {_cell(e['auroc_mean'])} | "
                         f"{_cell(probe.get('auroc_mean'))} |")
    lines += ["", "| task | AUROC pretrained - scratch [95% CI] | AUROC pretrained - probe "
              "[95% CI] |", "|---|---|---|", *deltas]
    if kshot:
        lines += ["", f"Fine-tuned (pretrained) on the label-efficiency curve's k-shot draws: "
                  f"the first {s['kshot_draws']} draw(s) of each k, the probe's rows (seeds "
                  f"[{s['kshot_seed']}, k, draw]), early-stopped on the whole tuning split; the "
                  "probe's mean over its draws beside it.", "",
                  "| task | k | draws | fine-tuned AUROC mean | probe AUROC mean |",
                  "|---|---|---:|---:|---:|", *kshot]
    return lines + ([""] + notes if notes else []) + [""]


def kshot_points(task_result: dict) -> list[tuple[int, float]]:
    """(n_train, mean held_out AUROC) of the fine-tuned k-shot curve, for the plot."""
    curve = (task_result.get("finetune") or {}).get("label_efficiency") or {}
    return [(e["n_train"], e["auroc_mean"]) for e in curve.values() if e["auroc_mean"] is not None]
