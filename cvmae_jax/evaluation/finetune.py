"""Fine-tuning on the label tasks, beside the frozen probe: the pretrained encoder plus a small
head trained on the task's train label windows (the probe's, empty windows left out), and the
same network from a random initialization (from scratch), so the value of pretraining is
measured.

Each model is trained with binary cross-entropy on shuffled batches of train windows, every
weight updated (the pretrained encoder at ``encoder_lr_scale`` times the head's rate, the
scratch encoder at the head's rate); every ``eval_every`` steps its tuning AUROC is measured,
the best parameters are kept, and training stops after ``patience`` checks without a better
one (checks during the learning rate's warmup do not count). Both models share the order of
batches and, unless the pretrained model's head starts at the frozen probe's weights
(``head_init="probe"``, checked before the first step), the head's initialization. One
compiled step (``cvmae_jax.finetune_steps``, under the run's launcher: jit over the data mesh,
or pmap) serves every task, model and k-shot draw. Held_out AUROC/AUPRC get subject-bootstrap
CIs, and the differences pretrained - scratch and pretrained - probe paired-bootstrap CIs (the
same resamples of subjects for both models). The exported probabilities are the logits' Platt
scaling on tuning (``calibration``; the network's own sigmoid where that cannot be used): a
network stopped early at its best tuning AUROC ranks well but need not be calibrated. Logs hold
counts and aggregates only.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import ml_collections
import numpy as np
from absl import logging
from scipy.special import expit
from sklearn.metrics import roc_auc_score

from cvmae_jax import parallel
from cvmae_jax.config_checks import check_finetune_config
from cvmae_jax.data.pipeline import padded_rows
from cvmae_jax.evaluation.calibration import platt
from cvmae_jax.evaluation.downstream import (TEST, TRAIN, TUNING, Probe, TaskData,
                                             held_out_metrics, single_class_reason)
from cvmae_jax.evaluation.exports import PREDICTION_SPLITS
from cvmae_jax.evaluation.formatting import number
from cvmae_jax.evaluation.label_efficiency import kshot_curve, kshot_probe
from cvmae_jax.evaluation.paired_stats import (NUM_BOOTSTRAP, SubjectBootstrap, one_class,
                                               paired_auroc_difference)
from cvmae_jax.finetune_steps import (finetune_warmup_steps, init_encoder, init_head,
                                      init_opt_state, make_finetune_optimizer,
                                      make_finetune_step, make_logit_step)
from cvmae_jax.metrics import clock
from cvmae_jax.model import ModelConfig
from cvmae_jax.steps import TrainState

MODELS = ("pretrained", "scratch")


def finetune_config(config) -> ml_collections.ConfigDict:
    """A checked copy of ``config.eval.finetune`` (one line naming the field when a value is
    unusable: ``config_checks.check_finetune_config``)."""
    settings = ml_collections.ConfigDict(dict(config.eval.finetune))
    check_finetune_config(settings)
    return settings


@dataclasses.dataclass
class Fit:
    """One trained classifier: its best parameters (host arrays), the step they come from and
    the record of training (``summary``)."""

    params: dict
    best_step: int
    steps_run: int
    tuning_auroc: float | None
    tuning_curve: list  # [step, tuning AUROC or None] per check
    train_loss: list  # [step, mean train loss since the previous check] per check
    nonfinite_steps: int
    seconds: float  # wall time of the fit (compile included for the first)

    def summary(self) -> dict:
        return dict(best_step=self.best_step, steps_run=self.steps_run,
                    tuning_auroc=self.tuning_auroc, tuning_curve=self.tuning_curve,
                    train_loss=self.train_loss, nonfinite_steps=self.nonfinite_steps,
                    seconds=self.seconds)


class EarlyStopping:
    """Keeps the parameters of the best check (highest score; the first of equals) and says
    when ``patience`` checks in a row after step ``warmup`` brought no better one: checks
    while the learning rate still rises keep a better score but never count toward stopping
    (an early lucky check must not end a run before its rate has peaked). A check without a
    score (tuning has one class) keeps the latest parameters and never stops training."""

    def __init__(self, patience: int, warmup: int = 0):
        self.patience, self.warmup, self.since_best = patience, warmup, 0
        self.best_score, self.best_step, self.best_params = None, 0, None

    def update(self, step: int, score: float | None, snapshot) -> bool:
        """Records a check at ``step``; ``snapshot()`` copies the parameters when they are
        kept. Returns whether to stop."""
        if score is None or self.best_score is None or score > self.best_score:
            self.best_score, self.best_step, self.best_params = score, step, snapshot()
            self.since_best = 0
            return False
        if step > self.warmup:
            self.since_best += 1
        return self.since_best >= self.patience


class Finetuner:
    """Trains and applies classifiers on label windows under ``launcher`` (``parallel``'s
    ``JitLauncher`` or ``PmapLauncher``); the head reads the encoder states pooled by
    ``pooling`` (pooling.py, as the frozen probe). The train step is compiled at the first
    ``fit`` and reused by every later one; ``traces`` counts its traces."""

    def __init__(self, launcher, model_config: ModelConfig, settings, max_len: int, seed: int,
                 pooling: str = "mean"):
        self.launcher, self.settings, self.max_len, self.seed = launcher, settings, max_len, seed
        self.model_config, self.pooling = model_config, pooling
        self.encoder_graphdef = init_encoder(model_config, seed)[0]
        self.head_graphdef = init_head(model_config, pooling, settings.head, 0.5, seed)[0]
        self.optimizer = make_finetune_optimizer(settings.learning_rate, settings.weight_decay,
                                                 settings.steps)
        self.traces: list = []
        self._body = make_finetune_step(self.encoder_graphdef, self.head_graphdef,
                                        self.optimizer, launcher.axis_name, self.traces)
        self._step = None
        self._logits = launcher.eval_step(make_logit_step(
            self.encoder_graphdef, self.head_graphdef, launcher.axis_name))

    def scratch_encoder(self) -> dict:
        """Randomly initialized encoder parameters (host arrays), seeded with ``seed``: with
        the run's seed, the initialization its pretraining started from."""
        return jax.device_get(init_encoder(self.model_config, self.seed)[1])

    def fit(self, encoder_params, train: list[dict], tuning: list[dict],
            encoder_lr_scale: float, name: str = "", head_weights=None) -> Fit:
        """Trains the encoder ``encoder_params`` plus a head on the ``train`` windows
        (``label_windows`` dicts), early-stopped on the tuning AUROC of ``tuning``; with a
        ``name``, logs each check (loss, tuning AUROC, steps/s, ETA). The head starts at zero
        weight, or at ``head_weights`` (kernel [W, 1], bias [1]: ``probe_head_weights``), and
        then is checked once before the first step, so the fit keeps the probe's classifier
        when no step does better on tuning."""
        s, start = self.settings, time.perf_counter()
        train_y = _labels(train)
        params = self.initial_params(encoder_params, float(train_y.mean()), head_weights)
        state = self.launcher.put_state(TrainState(
            step=np.zeros((), np.int32), params=params,
            opt_state=init_opt_state(self.optimizer, params, encoder_lr_scale)))
        batches = self._train_batches(train)
        if self._step is None:
            self._step = self.launcher.compile_train_step(self._body, state,
                                                          self._batch(train[:s.batch_size]))
        leaves = self._step.flatten(state)
        tuning_y = _labels(tuning)
        stopper = EarlyStopping(s.patience, finetune_warmup_steps(s.steps))
        curve, losses, window, nonfinite = [], [], [], 0

        def check(step: int) -> bool:
            """Scores the current parameters on tuning, keeps them if best; True: stop."""
            params = self._step.unflatten(leaves).params
            score = (None if one_class(tuning_y) else
                     float(roc_auc_score(tuning_y, self._logits_of(params, tuning))))
            curve.append([step, score])
            stop = stopper.update(step, score, lambda: jax.device_get(
                self.launcher.checkpoint_view(self._step.unflatten(leaves)).params))
            if name:
                pace = step / (time.perf_counter() - start)
                logging.info("finetune %s: step %d/%d | loss %s tuning AUROC %s (best %s at "
                             "%d) | %.2f steps/s ETA %s", name, step, s.steps,
                             f"{losses[-1][1]:.4f}" if losses else "n/a", number(score),
                             number(stopper.best_score), stopper.best_step, pace,
                             "0m00s" if stop else
                             clock((s.steps - step) / pace) if step else "n/a")
            return stop

        step = 0
        if head_weights is not None:
            check(0)
        for step in range(1, s.steps + 1):
            leaves, metrics = self._step(leaves, self._step.put(next(batches)))
            window.append(metrics)
            if step % s.eval_every and step < s.steps:
                continue
            fetched = self.launcher.fetch(window)
            window = []
            losses.append([step, float(np.mean([m["loss"] for m in fetched]))])
            nonfinite += sum(int(m["finite"] == 0) for m in fetched)
            if check(step):
                break
        return Fit(stopper.best_params, stopper.best_step, step, stopper.best_score, curve,
                   losses, nonfinite, time.perf_counter() - start)

    def initial_params(self, encoder_params, prevalence: float, head_weights=None) -> dict:
        """Host parameters {"encoder", "head"} a fit starts from: ``encoder_params`` and a head
        at zero weight predicting ``prevalence``, or with ``head_weights`` (kernel [W, 1],
        bias [1])."""
        head = jax.device_get(init_head(self.model_config, self.pooling, self.settings.head,
                                        prevalence, self.seed)[1])
        if head_weights is not None:
            head["out"]["kernel"].set_value(head_weights[0])
            head["out"]["bias"].set_value(head_weights[1])
        return dict(encoder=jax.device_get(encoder_params), head=head)

    def logits(self, params: dict, windows: list[dict]) -> np.ndarray:
        """Logits float64 [N] on ``windows`` of host parameters {"encoder", "head"} (as
        ``Fit.params`` holds them)."""
        return self._logits_of(self.launcher.put_state(params), windows)

    def _logits_of(self, params, windows: list[dict]) -> np.ndarray:
        """``logits`` of parameters already in the launcher's layout (``put_state``)."""
        b = self.settings.batch_size
        out = []
        for lo in range(0, len(windows), b):
            chunk = windows[lo:lo + b]
            logits = self._logits(params, self.launcher.put_batch(self._batch(chunk)))
            out.append(np.asarray(self.launcher.fetch(logits))[:len(chunk)])
        return np.concatenate(out).astype(np.float64) if out else np.zeros(0)

    def _batch(self, windows: list[dict]) -> dict:
        """Windows -> this process's rows of one padded global batch of ``batch_size`` rows."""
        batch = padded_rows(windows, self.max_len, self.settings.batch_size)
        del batch["example_id"]
        batch["label"] = np.zeros(self.settings.batch_size, np.float32)
        batch["label"][:len(windows)] = _labels(windows)
        batch["weight"] = (np.arange(self.settings.batch_size) < len(windows)).astype(np.float32)
        rows = self.settings.batch_size // jax.process_count()
        first = jax.process_index() * rows
        return {k: v[first:first + rows] for k, v in batch.items()}

    def _train_batches(self, windows: list[dict]):
        """Endless batches of ``windows``, reshuffled each epoch (seeded with ``seed`` and the
        number of windows); an epoch's last batch is completed with padding rows."""
        rng = np.random.default_rng([self.seed, len(windows)])
        b = self.settings.batch_size
        while True:
            order = rng.permutation(len(windows))
            for lo in range(0, len(order), b):
                yield self._batch([windows[i] for i in order[lo:lo + b]])


def probe_head_weights(probe: Probe) -> tuple[np.ndarray, np.ndarray]:
    """The linear head (kernel float32 [W, 1], bias float32 [1]) whose logit on a window vector
    x [W] is the probe's decision function: its logistic regression on the standardized
    vector, with the scaler folded into the weights."""
    coef = probe.model.coef_[0] / probe.scaler.scale_
    bias = probe.model.intercept_[0] - float(coef @ probe.scaler.mean_)
    return coef[:, None].astype(np.float32), np.array([bias], np.float32)


def _labels(windows: list[dict]) -> np.ndarray:
    return np.array([bool(w["label"]) for w in windows], bool)


def scored(y: np.ndarray, score: np.ndarray, subjects, seed: int) -> dict:
    """AUROC and AUPRC of ``score`` [N] on labels ``y`` [N] with subject-bootstrap 95% CIs
    (``subjects`` [N]: each row's subject id), or None with a reason when ``y`` has a single
    class."""
    y = np.asarray(y, bool)
    out = dict(n=int(len(y)), positives=int(y.sum()), auroc=None, auroc_ci=None, auprc=None,
               auprc_ci=None, bootstrap_used=0, reason=None)
    if one_class(y):
        out["reason"] = f"{TEST} split has a single class ({out['positives']} of {len(y)})"
        return out
    metrics = held_out_metrics(y, score, seed, subjects)
    out.update({k: metrics[k] for k in ("auroc", "auroc_ci", "auprc", "auprc_ci",
                                        "bootstrap_used")})
    return out


def paired_delta(y: np.ndarray, score: np.ndarray, reference: np.ndarray, subjects,
                 seed: int) -> dict:
    """AUROC(score) - AUROC(reference) (each [N], labels ``y`` [N], ``subjects`` [N]) on the
    same rows with a paired subject-bootstrap 95% CI (both scored on the same resamples); None
    when ``y`` has a single class."""
    y = np.asarray(y, bool)
    if one_class(y):
        return dict(delta=None, ci=None, reason=f"{TEST} split has a single class")
    difference = paired_auroc_difference(y, score, reference, SubjectBootstrap(subjects, seed))
    return dict(delta=difference["delta"], ci=difference["ci"], reason=None)


@dataclasses.dataclass
class TaskFinetune:
    """One task's fine-tuning results (``result``, for metrics.json) and each model's
    probabilities per split {model: {split: float64 [N]}} for the prediction exports."""

    result: dict
    probabilities: dict[str, dict[str, np.ndarray]]


def finetune_task(finetuner: Finetuner, pretrained_encoder, data: TaskData,
                  probe_score: np.ndarray | None, seed: int, task: str = "") -> TaskFinetune:
    """Trains the pretrained and the scratch classifier on one task (``TaskData``: the probe's
    windows) and scores both on held_out; with ``head_init="probe"`` the pretrained head starts
    at ``data.probe``'s weights. ``probe_score`` is the probe's held_out decision (None without
    a probe); ``task`` names it in the progress lines."""
    windows = data.windows
    train_y = _labels(windows[TRAIN])
    result = dict(n_train=int(len(train_y)), n_tuning=len(windows[TUNING]),
                  n=len(windows[TEST]), reason=None)
    if one_class(train_y):
        result["reason"] = single_class_reason(train_y)
        return TaskFinetune(result, {})
    test_y = _labels(windows[TEST])
    subjects = [int(w["subject_id"]) for w in windows[TEST]]
    settings = finetuner.settings
    from_probe = settings.head_init == "probe" and data.probe is not None
    encoders = dict(pretrained=(pretrained_encoder, settings.encoder_lr_scale,
                                probe_head_weights(data.probe) if from_probe else None))
    if settings.scratch:
        encoders["scratch"] = (finetuner.scratch_encoder(), 1.0, None)
    logits, probabilities = {}, {}
    for model, (encoder, scale, head_weights) in encoders.items():
        fit = finetuner.fit(encoder, windows[TRAIN], windows[TUNING], scale,
                            f"{task} {model}".strip(), head_weights)
        split_logits = {s: finetuner.logits(fit.params, windows[s]) for s in PREDICTION_SPLITS}
        logits[model] = split_logits[TEST]
        calibration, calibrated = platt(split_logits, _labels(windows[TUNING]))
        probabilities[model] = calibrated or {s: expit(np.asarray(v, np.float64))
                                              for s, v in split_logits.items()}
        result[model] = dict(scored(test_y, logits[model], subjects, seed),
                             encoder_lr_scale=scale,
                             head_init="zero" if head_weights is None else "probe",
                             calibration=calibration, **fit.summary())
    result["pretrained_vs_scratch"] = (
        paired_delta(test_y, logits["pretrained"], logits["scratch"], subjects, seed)
        if "scratch" in logits else
        dict(delta=None, ci=None, reason="no scratch model (config.eval.finetune.scratch=False)"))
    if probe_score is not None:
        result["pretrained_vs_probe"] = paired_delta(test_y, logits["pretrained"], probe_score,
                                                     subjects, seed)
    return TaskFinetune(result, probabilities)


def finetune_tasks(launcher, model_config: ModelConfig, pretrained_params,
                   tasks: dict[str, TaskData], probe_results: dict, settings, max_len: int,
                   seed: int, sample_seed: int, pooling: str = "mean"
                   ) -> tuple[dict, dict[str, TaskFinetune]]:
    """Fine-tunes on every task (``finetune_task``; the heads read ``pooling``) and, with
    ``settings.kshot_draws``, on the label-efficiency curve's k-shot draws
    (``label_efficiency.kshot_curve``: the probe's rows).
    Adds each task's result to ``probe_results[task]["finetune"]``; returns the shared settings
    (with the number of traces of the train step) and each task's ``TaskFinetune``."""
    parallel.check_batch_size(settings.batch_size, launcher.num_devices,
                              "config.eval.finetune.batch_size")
    finetuner = Finetuner(launcher, model_config, settings, max_len, seed, pooling)
    pretrained = jax.device_get(pretrained_params)
    out = {}
    for task, data in tasks.items():
        probe_score = None if data.probe is None else data.probe.decision(data.x[TEST])
        tuned = finetune_task(finetuner, pretrained, data, probe_score, seed, task)
        full_auroc = tuned.result.get("pretrained", {}).get("auroc")
        log_task(task, tuned.result)
        if settings.kshot_draws and full_auroc is not None:
            start = time.perf_counter()
            curve = _kshot(finetuner, pretrained, data, sample_seed, full_auroc)
            tuned.result["label_efficiency"] = curve
            logging.info("finetune %s: k-shot %s in %.0f s", task, ", ".join(
                f"k={k} AUROC {number(e['auroc_mean'])}" for k, e in curve.items() if k != "all"),
                time.perf_counter() - start)
        probe_results[task]["finetune"] = tuned.result
        out[task] = tuned
    record = dict(dict(settings), pooling=pooling, seed=int(seed), split=TEST,
                  num_bootstrap=NUM_BOOTSTRAP, launcher=type(launcher).__name__,
                  devices=launcher.num_devices,
                  models=[m for m in MODELS if settings.scratch or m != "scratch"],
                  kshot_seed=int(sample_seed),
                  train_step_traces=len(finetuner.traces))
    return record, out


def _kshot(finetuner: Finetuner, pretrained, data: TaskData, sample_seed: int,
           full_auroc: float) -> dict:
    """The fine-tuned (pretrained) classifier's k-shot curve: ``kshot_draws`` draws per k."""
    train, test = data.windows[TRAIN], data.windows[TEST]
    test_y = _labels(test)
    settings = finetuner.settings

    def auroc_of_draw(idx):
        head_weights = None
        if settings.head_init == "probe":  # the probe's k-shot fit on the same rows
            head_weights = probe_head_weights(kshot_probe(data.x[TRAIN], data.y[TRAIN], idx,
                                                          data.probe, sample_seed))
        fit = finetuner.fit(pretrained, [train[i] for i in idx], data.windows[TUNING],
                            settings.encoder_lr_scale, head_weights=head_weights)
        return roc_auc_score(test_y, finetuner.logits(fit.params, test))

    return kshot_curve(auroc_of_draw, _labels(train), sample_seed, full_auroc,
                       draws=finetuner.settings.kshot_draws,
                       common=dict(split=TEST, n_test=len(test)))


def log_task(task: str, r: dict) -> None:
    """One console line per task: held_out AUROC of both models, steps, and the delta."""
    if r.get("reason"):
        logging.info("finetune %s: skipped (%s)", task, r["reason"])
        return
    parts = [f"{m} AUROC {number(r[m]['auroc'])} (best step {r[m]['best_step']} of "
             f"{r[m]['steps_run']}, {r[m]['seconds']:.0f} s)" for m in MODELS if m in r]
    delta = r["pretrained_vs_scratch"]["delta"]
    logging.info("finetune %s: %s; pretrained - scratch %s", task, ", ".join(parts),
                 number(delta))
