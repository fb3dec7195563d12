"""Fine-tuning on label windows, on constructed windows and a tiny encoder: the loss falls, the
step compiles once for every model, jit and pmap train alike over 8 devices, early stopping keeps
the best check, and the held_out statistics are paired. (eval.py's fine-tuning end to end, with
its exports, is in eval_finetune_test.py.)"""

import jax
import ml_collections
import numpy as np
import pytest
from flax import nnx
from sklearn.metrics import roc_auc_score

from cvmae_jax import parallel
from cvmae_jax.config import finetune_defaults
from cvmae_jax.data.pipeline import padded_rows
from cvmae_jax.evaluation.downstream import (TaskData, embed_label_windows, fit_probe,
                                             make_embed_fn)
from cvmae_jax.evaluation import finetune
from cvmae_jax.evaluation.finetune import (EarlyStopping, Finetuner, finetune_config,
                                           finetune_task, paired_delta, probe_head_weights)
from cvmae_jax.evaluation.label_efficiency import K_SHOTS
from cvmae_jax.finetune_steps import init_opt_state, make_finetune_optimizer
from cvmae_jax.model import ModelConfig
from cvmae_jax.pooling import per_code_pool, pooled_width

MAX_LEN, VOCAB = 12, 6
MODEL = ModelConfig(vocab_size=VOCAB, d_model=16, num_heads=2, num_layers=1, mlp_ratio=2,
                    time_frequencies=2)


def _windows(rng, n: int, first_subject: int = 0) -> list[dict]:
    """Windows of 3..MAX_LEN events; a positive's values are shifted up by 0.5, its
    code-1 values by 2."""
    out = []
    for i in range(n):
        label = bool(i % 3 == 0)
        length = int(rng.integers(3, MAX_LEN + 1))
        codes = rng.integers(0, VOCAB, length).astype(np.int32)
        values = rng.normal(size=length) + 1.5 * label * (codes == 1) + 0.5 * label
        out.append(dict(times=np.sort(rng.random(length) * 48).astype(np.float32), codes=codes,
                        values=values.astype(np.float32), label=label,
                        subject_id=np.int64(first_subject + i)))
    return out


@pytest.fixture(scope="module")
def windows():
    rng = np.random.default_rng(0)
    return dict(train=_windows(rng, 96), tuning=_windows(rng, 48, 1000))


def _settings(**overrides) -> ml_collections.ConfigDict:
    settings = finetune_defaults()
    settings.update(dict(dict(steps=24, batch_size=16, learning_rate=1e-2, eval_every=6,
                              patience=10), **overrides))
    return settings


def _encoder(seed=0):
    return Finetuner(parallel.JitLauncher(jax.devices()), MODEL, _settings(), MAX_LEN,
                     seed).scratch_encoder()


def test_loss_falls_and_one_compile_serves_every_model(windows):
    finetuner = Finetuner(parallel.JitLauncher(jax.devices()), MODEL, _settings(), MAX_LEN, 0)
    assert finetuner.launcher.num_devices == 8  # data-parallel over the fake devices
    pretrained = finetuner.fit(_encoder(1), windows["train"], windows["tuning"], 0.1)
    scratch = finetuner.fit(finetuner.scratch_encoder(), windows["train"], windows["tuning"],
                            1.0)
    subset = finetuner.fit(_encoder(1), windows["train"][:20], windows["tuning"], 0.1)
    assert len(finetuner.traces) == 1  # the step compiled once for all three
    for fit in (pretrained, scratch):
        losses = [loss for _, loss in fit.train_loss]
        assert losses[-1] < 0.9 * losses[0], losses
        assert fit.tuning_auroc > 0.7 and fit.nonfinite_steps == 0
        assert [step for step, _ in fit.tuning_curve] == [6, 12, 18, 24]
    assert subset.steps_run == 24


def test_a_per_code_head_reads_each_codes_states(windows):
    """With ``per_code`` pooling the head's input is pooling.per_code_pool of the encoder's
    states (D + V * (D + 1) numbers), and the logits are that vector times the head's weights."""
    finetuner = Finetuner(parallel.JitLauncher(jax.devices()), MODEL, _settings(), MAX_LEN, 0,
                          pooling="per_code")
    fit = finetuner.fit(_encoder(1), windows["train"], windows["tuning"], 0.1)
    losses = [loss for _, loss in fit.train_loss]
    assert losses[-1] < 0.9 * losses[0] and fit.tuning_auroc > 0.7, (losses, fit.tuning_auroc)
    kernel = np.asarray(fit.params["head"]["out"]["kernel"])
    assert kernel.shape == (pooled_width("per_code", MODEL.d_model, VOCAB), 1)
    assert np.abs(kernel[MODEL.d_model:]).sum() > 0  # the per-code columns were trained
    batch = padded_rows(windows["tuning"][:16], MAX_LEN, 16)
    encoder = nnx.merge(finetuner.encoder_graphdef, fit.params["encoder"])
    valid = jax.numpy.asarray(batch["valid"])
    hidden = encoder.encode(batch["times"], batch["codes"], batch["values"],
                            jax.numpy.zeros_like(valid), valid)
    by_hand = (np.asarray(per_code_pool(hidden, batch["codes"], valid, VOCAB)) @ kernel[:, 0]
               + np.asarray(fit.params["head"]["out"]["bias"])[0])
    np.testing.assert_allclose(finetuner.logits(fit.params, windows["tuning"][:16]), by_hand,
                               rtol=1e-4, atol=1e-4)


def test_jit_and_pmap_train_alike(windows):
    fits = {}
    for launcher in (parallel.JitLauncher(jax.devices()),
                     parallel.PmapLauncher(jax.devices())):
        finetuner = Finetuner(launcher, MODEL, _settings(steps=12), MAX_LEN, 0)
        fits[type(launcher).__name__] = finetuner.fit(_encoder(1), windows["train"],
                                                      windows["tuning"], 0.1)
        assert len(finetuner.traces) == 1
    jit, pmap = fits["JitLauncher"], fits["PmapLauncher"]
    np.testing.assert_allclose([v for _, v in pmap.train_loss], [v for _, v in jit.train_loss],
                               rtol=1e-4)
    for p, j in zip(jax.tree.leaves(pmap.params), jax.tree.leaves(jit.params), strict=True):
        np.testing.assert_allclose(p, j, rtol=1e-3, atol=1e-5)


def test_early_stopping_keeps_the_first_best_check():
    stopper = EarlyStopping(patience=2)
    scores = {10: 0.6, 20: 0.8, 30: 0.8, 40: 0.7, 50: 0.9}
    stops = [stopper.update(step, s, lambda step=step: f"params@{step}")
             for step, s in scores.items() if step <= 40]
    assert stops == [False, False, False, True]
    assert (stopper.best_step, stopper.best_score, stopper.best_params) == (20, 0.8,
                                                                            "params@20")
    without_score = EarlyStopping(patience=1)
    assert not any(without_score.update(step, None, lambda step=step: step)
                   for step in (1, 2, 3))
    assert without_score.best_params == 3  # tuning has one class: the last parameters


def test_early_stopping_does_not_count_checks_during_warmup():
    """A lucky check while the rate still rises is kept, but only checks after the warmup
    count toward patience: a run stops no sooner than warmup + patience checks."""
    scores = {20: 0.8, 40: 0.6, 60: 0.7, 80: 0.75, 100: 0.79}

    def stops(warmup):
        stopper = EarlyStopping(patience=2, warmup=warmup)
        return [stopper.update(step, s, lambda step=step: step)
                for step, s in scores.items()], stopper

    without_warmup, _ = stops(0)
    assert without_warmup[:3] == [False, False, True]  # stops at 60
    with_warmup, stopper = stops(60)
    assert with_warmup == [False, False, False, False, True]  # 80 and 100 count, 40 and 60 not
    assert (stopper.best_step, stopper.best_score, stopper.best_params) == (20, 0.8, 20)


def test_fit_returns_the_parameters_of_its_best_check(windows):
    """A high rate and a check every step: the tuning AUROC moves, training stops early and
    the returned parameters reproduce the best check's AUROC, not the last one's."""
    finetuner = Finetuner(parallel.JitLauncher(jax.devices()), MODEL,
                          _settings(steps=40, eval_every=1, patience=3, learning_rate=3e-2),
                          MAX_LEN, 0)
    fit = finetuner.fit(_encoder(1), windows["train"], windows["tuning"], 1.0)
    scores = [s for _, s in fit.tuning_curve]
    assert fit.steps_run < 40 and fit.best_step < fit.steps_run
    assert fit.tuning_auroc == max(scores) and scores[-1] < max(scores)
    assert fit.best_step == fit.tuning_curve[scores.index(max(scores))][0]
    tuning_y = [w["label"] for w in windows["tuning"]]
    again = roc_auc_score(tuning_y, finetuner.logits(fit.params, windows["tuning"]))
    assert again == pytest.approx(fit.tuning_auroc, abs=1e-6)


def test_fit_counts_no_check_of_the_warmup_toward_patience(windows, monkeypatch):
    """40 steps (a 4-step warmup), a check every step, patience 1, and every check after the
    first worse than it: the first check after the warmup (step 5) ends the fit."""
    scores = iter([0.9] + [0.5] * 40)
    monkeypatch.setattr(finetune, "roc_auc_score", lambda y, s: next(scores))
    finetuner = Finetuner(parallel.JitLauncher(jax.devices()), MODEL,
                          _settings(steps=40, eval_every=1, patience=1), MAX_LEN, 0)
    fit = finetuner.fit(_encoder(1), windows["train"], windows["tuning"], 1.0)
    assert (fit.best_step, fit.steps_run) == (1, 5)


def test_fit_checks_its_last_step_between_two_checks(windows):
    finetuner = Finetuner(parallel.JitLauncher(jax.devices()), MODEL,
                          _settings(steps=10, eval_every=4), MAX_LEN, 0)
    fit = finetuner.fit(_encoder(1), windows["train"], windows["tuning"], 1.0)
    assert [step for step, _ in fit.tuning_curve] == [4, 8, 10]
    assert [step for step, _ in fit.train_loss] == [4, 8, 10]


def test_the_encoder_scale_multiplies_only_the_encoders_updates():
    optimizer = make_finetune_optimizer(1e-2, 0.01, num_steps=10)  # warmup: 1 step at rate 0
    params = dict(encoder=dict(w=np.ones(3, np.float32)), head=dict(w=np.full(2, 0.5, np.float32)))
    grads = dict(encoder=dict(w=np.array([0.1, -0.2, 0.3], np.float32)),
                 head=dict(w=np.array([0.4, -0.1], np.float32)))
    updates = {}
    for scale in (0.1, 1.0):
        state = init_opt_state(optimizer, params, scale)
        for _ in range(2):
            updates[scale], state = optimizer.update(grads, state, params)
    assert np.abs(updates[1.0]["encoder"]["w"]).min() > 0
    np.testing.assert_allclose(updates[0.1]["encoder"]["w"], 0.1 * updates[1.0]["encoder"]["w"],
                               rtol=1e-6)
    np.testing.assert_array_equal(updates[0.1]["head"]["w"], updates[1.0]["head"]["w"])


def test_paired_delta_of_a_model_with_itself_and_a_better_one():
    rng = np.random.default_rng(3)
    y = rng.random(200) < 0.3
    weak, strong = y + rng.normal(0, 2, 200), y + rng.normal(0, 0.3, 200)
    subjects = np.arange(200) // 2  # two rows per subject
    same = paired_delta(y, weak, weak, subjects, 0)
    assert same["delta"] == 0 and same["ci"] == [0.0, 0.0]
    better = paired_delta(y, strong, weak, subjects, 0)
    assert better["delta"] > 0.1 and 0 < better["ci"][0] <= better["delta"] <= better["ci"][1]
    assert paired_delta(np.zeros(5, bool), weak[:5], weak[:5], subjects[:5], 0)["delta"] is None


def test_finetune_config_names_a_bad_field():
    config = ml_collections.ConfigDict(dict(eval=dict(finetune=finetune_defaults())))
    assert dict(finetune_config(config)) == dict(finetune_defaults())
    config.eval.finetune = dict(finetune_defaults(), head="deep")
    with pytest.raises(ValueError, match=r"config.eval.finetune.head='deep': expected one of"):
        finetune_config(config)
    config.eval.finetune = dict(finetune_defaults(), patience=0)
    with pytest.raises(ValueError, match=r"config.eval.finetune.patience=0"):
        finetune_config(config)
    config.eval.finetune = dict(finetune_defaults(), head_init="random")
    with pytest.raises(ValueError, match=r"head_init='random': expected one of"):
        finetune_config(config)
    config.eval.finetune = dict(finetune_defaults(), head_init="probe", head="mlp")
    with pytest.raises(ValueError, match=r"head_init='probe': the probe's weights fit only"):
        finetune_config(config)


@pytest.mark.parametrize("scratch", [True, False])
def test_the_scratch_model_is_trained_only_when_asked(windows, scratch, caplog):
    data = _task_without_probe(windows)
    finetuner = Finetuner(parallel.JitLauncher(jax.devices()), MODEL,
                          _settings(steps=6, eval_every=6, scratch=scratch), MAX_LEN, 0)
    with caplog.at_level("INFO"):
        tuned = finetune_task(finetuner, _encoder(1), data, None, seed=0, task="death")
    assert sorted(tuned.probabilities) == (["pretrained", "scratch"] if scratch
                                           else ["pretrained"])
    progress = [r.getMessage() for r in caplog.records if "step 6/6" in r.getMessage()]
    assert [line.split(":")[0] for line in progress] == [
        "finetune death pretrained", *(["finetune death scratch"] if scratch else [])]
    assert all("tuning AUROC" in line and "ETA 0m00s" in line for line in progress)
    assert ("scratch" in tuned.result) == scratch
    delta = tuned.result["pretrained_vs_scratch"]
    assert (delta["delta"] is not None) == scratch
    assert scratch or "config.eval.finetune.scratch=False" in delta["reason"]


def _task_without_probe(windows) -> TaskData:
    """The windows with 48 held_out ones, and no frozen vectors or probe."""
    held_out = _windows(np.random.default_rng(3), 48, 2000)
    return TaskData(task_dir=None, windows=dict(windows, held_out=held_out), x={}, y={},
                    probe=None)


def _record_fits(finetuner, monkeypatch) -> list[dict]:
    """Each later ``finetuner.fit`` call's encoder, train windows and encoder scale."""
    calls, fit = [], finetuner.fit

    def recording(encoder, train, tuning, scale, name="", head_weights=None):
        calls.append(dict(name=name, encoder=encoder, train=train, scale=scale))
        return fit(encoder, train, tuning, scale, name, head_weights)

    monkeypatch.setattr(finetuner, "fit", recording)
    return calls


def test_the_scratch_model_starts_from_an_untrained_encoder(windows, monkeypatch):
    data = _task_without_probe(windows)
    finetuner = Finetuner(parallel.JitLauncher(jax.devices()), MODEL,
                          _settings(steps=6, eval_every=6, encoder_lr_scale=0.3), MAX_LEN, 0)
    calls = _record_fits(finetuner, monkeypatch)
    pretrained = _encoder(1)
    finetune_task(finetuner, pretrained, data, None, seed=0, task="death")
    started = {call["name"]: call for call in calls}
    assert (started["death pretrained"]["scale"], started["death scratch"]["scale"]) == (0.3, 1.0)
    for name, encoder in (("death pretrained", pretrained),
                          ("death scratch", finetuner.scratch_encoder())):
        for a, b in zip(jax.tree.leaves(started[name]["encoder"]), jax.tree.leaves(encoder),
                        strict=True):
            np.testing.assert_array_equal(a, b)
    assert not all(np.array_equal(a, b) for a, b in zip(
        jax.tree.leaves(pretrained), jax.tree.leaves(finetuner.scratch_encoder())))


def test_kshot_fits_train_on_their_drawn_windows_only(windows, monkeypatch):
    data = _task_without_probe(windows)
    finetuner = Finetuner(parallel.JitLauncher(jax.devices()), MODEL,
                          _settings(steps=6, eval_every=6, kshot_draws=2), MAX_LEN, 0)
    calls = _record_fits(finetuner, monkeypatch)
    curve = finetune._kshot(finetuner, _encoder(1), data, sample_seed=5, full_auroc=0.8)
    ks = [k for k in K_SHOTS if k < len(windows["train"])]
    assert [len(call["train"]) for call in calls] == [k for k in ks for _ in range(2)]
    train_subjects = {int(w["subject_id"]) for w in windows["train"]}
    assert all({int(w["subject_id"]) for w in call["train"]} <= train_subjects for call in calls)
    assert [key for key in curve] == [*map(str, ks), "all"]


def _probe_task(windows, finetuner, encoder) -> TaskData:
    """The windows with their frozen per-code vectors and a probe fit on train (C=0.1)."""
    rng = np.random.default_rng(3)
    split_windows = dict(windows, held_out=_windows(rng, 48, 2000))
    embed = make_embed_fn(finetuner.encoder_graphdef, finetuner.pooling, VOCAB)
    x = {s: embed_label_windows(finetuner.encoder_graphdef, encoder, ws, MAX_LEN, 16, embed)
         for s, ws in split_windows.items()}
    y = {s: np.array([w["label"] for w in ws], bool) for s, ws in split_windows.items()}
    return TaskData(None, split_windows, x, y, fit_probe(x["train"], y["train"], 0.1))


@pytest.mark.parametrize("pooling", ["per_code_last", "per_code_last_max"])
def test_a_head_from_the_probe_starts_as_the_probe_and_keeps_it_unless_tuning_improves(
        windows, pooling):
    """``head_init = "probe"``: the head's logits before any step are the probe's decision
    function (the scaler folded into the weights); the fit checks them at step 0 and returns
    them when no later check beats them on tuning."""
    finetuner = Finetuner(parallel.JitLauncher(jax.devices()), MODEL,
                          _settings(steps=12, learning_rate=1e-5, head_init="probe"), MAX_LEN,
                          0, pooling=pooling)
    encoder = _encoder(1)
    data = _probe_task(windows, finetuner, encoder)
    kernel, bias = probe_head_weights(data.probe)
    assert kernel.shape == (pooled_width(pooling, MODEL.d_model, VOCAB), 1)
    assert np.abs(kernel).sum() > 0 and bias.shape == (1,)
    fit = finetuner.fit(encoder, windows["train"], windows["tuning"], 0.1,
                        head_weights=(kernel, bias))
    assert fit.nonfinite_steps == 0
    probe_auroc = roc_auc_score(data.y["tuning"], data.probe.decision(data.x["tuning"]))
    assert fit.tuning_curve[0] == [0, pytest.approx(probe_auroc, abs=1e-6)]
    assert fit.best_step == 0  # at a rate of 1e-5 no step beats the probe on tuning
    np.testing.assert_allclose(fit.params["head"]["out"]["kernel"], kernel)
    start = finetuner.initial_params(encoder, 0.5, (kernel, bias))
    np.testing.assert_allclose(finetuner.logits(start, windows["tuning"]),
                               data.probe.decision(data.x["tuning"]), rtol=1e-4, atol=1e-4)
    tuned = finetune_task(finetuner, encoder, data, None, seed=0)
    assert tuned.result["pretrained"]["head_init"] == "probe"
    assert tuned.result["scratch"]["head_init"] == "zero"
    assert tuned.result["pretrained"]["tuning_curve"][0][0] == 0
    assert tuned.result["scratch"]["tuning_curve"][0][0] == 6

