"""Checks of config values that need no data and no devices, so a typo stops a run (or a
preparation) with one line naming the field before anything is read or written."""

from __future__ import annotations

import difflib
import re

import ml_collections

from cvmae_jax.config import default_config, study_fields
from cvmae_jax.data.meds import SPLITS
from cvmae_jax.data.sequences import WINDOWS
from cvmae_jax.jsonio import MOUNT_HINT, is_url
from cvmae_jax.mask_probabilities import STRATEGIES, TWO_TIER_STRATEGIES

MODEL_DTYPES = ("float32", "bfloat16", "float16")
POOLINGS = ("mean", "per_code", "per_code_last", "per_code_last_max")  # eval.pooling (pooling.py)
LABEL_WINDOWS = ("last_events", "each_code_latest")  # eval.label_window (sequences.window_rows)
FINETUNE_HEADS = ("linear", "mlp")  # eval.finetune.head (finetune_steps.ClassifierHead)
FINETUNE_HEAD_INITS = ("zero", "probe")  # eval.finetune.head_init (evaluation/finetune.py)
PARALLEL_MODES = ("jit", "pmap")  # config.parallel.mode (parallel.make_launcher)
TRANSFER_GUARDS = ("allow", "log", "disallow", "log_explicit", "disallow_explicit")
# Fields eval.py may override on a run's config.json: none changes the trained model or data.
EVAL_OVERRIDABLE = ("eval.", "data.meds_dir", "data.data_dir", "model.attention")


def eval_overridable() -> str:
    """EVAL_OVERRIDABLE for messages: "eval.*, data.meds_dir, ..."."""
    return ", ".join(f"{prefix}*" if prefix.endswith(".") else prefix
                     for prefix in EVAL_OVERRIDABLE)


def field_names(config: ml_collections.ConfigDict, prefix: str = "") -> set[str]:
    """Dotted names of every leaf field ("train.num_steps", ...)."""
    names = set()
    for key, value in config.items():
        if isinstance(value, ml_collections.ConfigDict):
            names |= field_names(value, f"{prefix}{key}.")
        else:
            names.add(f"{prefix}{key}")
    return names


def check_sections(config) -> None:
    """Refuses a config without every top-level field of ``default_config`` (seed, data,
    model, train, ...): a config file's ``get_config`` builds on that function."""
    missing = [name for name in default_config() if name not in config]
    if missing:
        raise ValueError(f"the config lacks {', '.join(missing)}: build get_config() "
                         "on cvmae_jax.config.default_config() and change its fields")


def check_known_fields(config) -> None:
    """Refuses a field that cvmae_jax/config.py's ``default_config`` (or, in a study config,
    ``study_fields``) does not have: a misspelt name set in a config file would otherwise be
    carried along and never read."""
    known = field_names(default_config()) | field_names(
        ml_collections.ConfigDict(dict(study=study_fields(()))))
    unknown = sorted(name for name in field_names(config) if name not in known)
    if unknown:
        close = difflib.get_close_matches(unknown[0], sorted(known), n=1, cutoff=0.75)
        raise ValueError(f"config.{unknown[0]}: no such config field (set by the config file; "
                         "the fields are cvmae_jax/config.py's)"
                         + (f"; did you mean config.{close[0]}?" if close else "")
                         + (f" ({len(unknown) - 1} more unknown: "
                            f"{', '.join('config.' + n for n in unknown[1:4])})"
                            if len(unknown) > 1 else ""))


def _require(ok: bool, field: str, value, expected: str) -> None:
    if not ok:
        raise ValueError(f"config.{field}={value!r}: {expected}")


def _require_local_path(field: str, value) -> None:
    _require(not (value and is_url(value)), field, value, f"a URL; {MOUNT_HINT}")


def _require_int(field: str, value, low: int, note: str = "") -> None:
    _require(isinstance(value, int) and not isinstance(value, bool) and value >= low, field,
             value, f"expected an integer >= {low}{note}")


def is_seed(value) -> bool:
    """An integer in [0, 2**32): what NumPy, scikit-learn and JAX all take as a seed (JAX
    keeps only the low 32 bits of a larger one)."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2 ** 32


def _require_seed(field: str, value) -> None:
    _require(is_seed(value), field, value, "expected an integer in [0, 2**32)")


def check_data_config(data) -> None:
    """``config.data``: the lab selection, clipping and windowing settings."""
    try:
        re.compile(data.lab_code_pattern)
    except (re.error, TypeError) as error:
        raise ValueError(f"config.data.lab_code_pattern={data.lab_code_pattern!r}: not a "
                         f"valid regular expression ({error})") from None
    for name, low in (("top_k", 0), ("min_code_count", 0), ("min_subjects", 1), ("max_len", 1),
                      ("min_window_len", 1), ("workers", 0), ("prepare_workers", 1)):
        _require_int(f"data.{name}", data[name], low,
                     " (0: every matching code)" if name == "top_k" else "")
    _require(data.min_window_len <= data.max_len, "data.min_window_len", data.min_window_len,
             f"must be <= config.data.max_len={data.max_len}")
    _require(data.window in WINDOWS, "data.window", data.window, f"expected one of {WINDOWS}")
    _require_seed("data.synthetic_seed", data.synthetic_seed)
    _require(not any(str(code)[:1] in "([" for code in data.lab_codes or ()), "data.lab_codes",
             tuple(data.lab_codes or ()), "a code starts with a bracket: a tuple typed on the "
             "command line needs quotes, --config.data.lab_codes='(\"LAB//50912//mg/dL\", "
             "\"LAB//50971//mEq/L\")'")
    for name in ("meds_dir", "data_dir"):
        _require_local_path(f"data.{name}", data[name])
    quantiles = tuple(data.clip_quantiles)
    _require(len(quantiles) == 2 and 0.0 <= quantiles[0] < quantiles[1] <= 1.0,
             "data.clip_quantiles", quantiles, "expected (low, high) with 0 <= low < high <= 1")


def check_parallel_config(parallel) -> None:
    """``config.parallel``: checked before the devices start (it sets them up)."""
    _require(parallel.mode in PARALLEL_MODES, "parallel.mode", parallel.mode,
             f"expected one of {PARALLEL_MODES}")
    _require_int("parallel.num_devices", parallel.num_devices, 0, " (0: all devices)")
    _require_int("parallel.cpu_devices", parallel.cpu_devices, 0, " (0: JAX's default, 1)")
    if parallel.num_processes is not None:
        _require_int("parallel.num_processes", parallel.num_processes, 1)
    _require(parallel.mode != "pmap" or (parallel.num_processes or 1) == 1,
             "parallel.mode", parallel.mode,
             f"pmap runs on one process, and config.parallel.num_processes="
             f"{parallel.num_processes}; use mode 'jit' on several processes")


def check_config(config) -> None:
    """The whole run config (``config.data`` and ``config.parallel`` included);
    device-dependent checks (batch sizes, attention backend) are in
    ``run_setup.validate_config``."""
    check_sections(config)
    check_known_fields(config)
    _require_seed("seed", config.seed)
    check_parallel_config(config.parallel)
    check_data_config(config.data)
    masking = config.masking
    _require(masking.strategy in STRATEGIES, "masking.strategy", masking.strategy,
             f"expected one of {STRATEGIES}")
    for name in ("p_high", "p_low"):
        _require(0.0 <= masking[name] <= 1.0, f"masking.{name}", masking[name],
                 "a masking probability must lie in [0, 1]")
    _require(0.0 <= masking.threshold_percentile <= 100.0, "masking.threshold_percentile",
             masking.threshold_percentile, "expected a percentile in [0, 100]")
    _require(masking.p_low <= masking.p_high, "masking.p_low", masking.p_low,
             f"must be <= config.masking.p_high={masking.p_high!r} (p_high is the probability "
             "of the high tier; swapped, the tiers would be inverted)")
    model = config.model
    for name in ("d_model", "num_heads", "num_layers", "mlp_ratio", "time_frequencies"):
        _require_int(f"model.{name}", model[name], 1)
    _require(model.d_model % model.num_heads == 0, "model.d_model", model.d_model,
             f"must be divisible by config.model.num_heads={model.num_heads}")
    _require(model.dtype in MODEL_DTYPES, "model.dtype", model.dtype,
             f"expected one of {MODEL_DTYPES}")
    _require(config.loss.unmasked_weight >= 0.0, "loss.unmasked_weight",
             config.loss.unmasked_weight, "expected >= 0")
    train = config.train
    for name, low in (("num_steps", 1), ("batch_size", 1), ("warmup_steps", 0),
                      ("log_every", 1), ("eval_every", 1), ("checkpoint_every", 1),
                      ("keep_checkpoints", 1)):
        _require_int(f"train.{name}", train[name], low)
    _require(train.learning_rate > 0.0, "train.learning_rate", train.learning_rate,
             "expected > 0")
    _require(train.weight_decay >= 0.0, "train.weight_decay", train.weight_decay,
             "expected >= 0")
    _require(train.grad_clip_norm > 0.0, "train.grad_clip_norm", train.grad_clip_norm,
             "expected > 0")
    _require(train.transfer_guard in TRANSFER_GUARDS, "train.transfer_guard",
             train.transfer_guard, f"expected one of {TRANSFER_GUARDS} (jax.transfer_guard)")
    check_eval_config(config.eval)


def config_warnings(config) -> list[str]:
    """Settings that run but are likely not what was meant, one sentence each naming the
    fields (train.py logs them as warnings)."""
    train, masking = config.train, config.masking
    out = []
    if train.warmup_steps >= train.num_steps:
        out.append(f"config.train.warmup_steps={train.warmup_steps} >= config.train.num_steps="
                   f"{train.num_steps}: the learning rate rises for the whole run and never "
                   f"reaches config.train.learning_rate={train.learning_rate!r}")
    if train.checkpoint_every > train.num_steps:
        out.append(f"config.train.checkpoint_every={train.checkpoint_every} > "
                   f"config.train.num_steps={train.num_steps}: only the last step is saved, "
                   "so a run killed before it starts again from step 0")
    if masking.strategy != "random" and masking.p_high == masking.p_low:
        out.append(f"config.masking.p_high = config.masking.p_low = {masking.p_high!r}: both "
                   f"tiers mask alike, so strategy {masking.strategy!r} is uniform masking")
    elif masking.strategy in TWO_TIER_STRATEGIES and masking.threshold_percentile >= 100.0:
        out.append(f"config.masking.threshold_percentile={masking.threshold_percentile!r}: no "
                   f"code lies above it, so every code gets config.masking.p_low="
                   f"{masking.p_low!r} (uniform masking)")
    return out


# Unpacked train windows whose real tokens fill less than this share of their max_len slots
# are mostly padding: compute spent on nothing (short stays, e.g. ICU stays of 48 h).
MIN_REAL_TOKEN_FRACTION = 0.5


def padding_warnings(data, num_tokens: int, num_windows: int) -> list[str]:
    """Without ``data.packing``: a warning when ``num_windows`` train windows of
    ``data.max_len`` slots hold ``num_tokens`` real tokens, under MIN_REAL_TOKEN_FRACTION of
    the slots (the counts of the prepared train split)."""
    if data.packing or not num_windows:
        return []
    fraction = num_tokens / (num_windows * data.max_len)
    if fraction >= MIN_REAL_TOKEN_FRACTION:
        return []
    return [f"config.data.packing=False: the train windows fill {fraction:.0%} of their "
            f"config.data.max_len={data.max_len} slots ({num_tokens:,} real tokens in "
            f"{num_windows:,} windows), so most of each batch is padding; pass "
            "--config.data.packing=True to put several windows in a row"]


def check_eval_config(eval_config) -> None:
    """``config.eval``: the validation split, evaluation mask rate, batch size, label window,
    pooling and fine-tuning settings."""
    _require(eval_config.split in SPLITS, "eval.split", eval_config.split,
             f"expected one of {', '.join(SPLITS)}")
    _require(0.0 < eval_config.mask_rate <= 1.0, "eval.mask_rate", eval_config.mask_rate,
             "expected a rate in (0, 1]")
    _require_int("eval.batch_size", eval_config.batch_size, 1)
    for name in ("mask_seed", "sample_seed"):
        _require_seed(f"eval.{name}", eval_config[name])
    _require_int("eval.label_max_len", eval_config.label_max_len, 0, " (0: data.max_len)")
    _require_local_path("eval.labels_dir", eval_config.labels_dir)
    _require(eval_config.pooling in POOLINGS, "eval.pooling", eval_config.pooling,
             f"expected one of {', '.join(POOLINGS)}")
    _require(eval_config.label_window in LABEL_WINDOWS, "eval.label_window",
             eval_config.label_window,
             f"expected one of {', '.join(LABEL_WINDOWS)}")
    check_finetune_config(eval_config.finetune)


def check_finetune_config(finetune) -> None:
    """``config.eval.finetune``: checked with the rest of the config, so a typo stops
    ``train.py`` before training rather than ``eval.py`` after it."""
    for name in ("steps", "batch_size", "eval_every", "patience"):
        _require_int(f"eval.finetune.{name}", finetune[name], 1)
    _require_int("eval.finetune.kshot_draws", finetune.kshot_draws, 0)
    for name in ("learning_rate", "encoder_lr_scale"):
        _require(finetune[name] > 0, f"eval.finetune.{name}", finetune[name], "expected > 0")
    _require(finetune.weight_decay >= 0, "eval.finetune.weight_decay", finetune.weight_decay,
             "expected >= 0")
    _require(finetune.head in FINETUNE_HEADS, "eval.finetune.head", finetune.head,
             f"expected one of {', '.join(FINETUNE_HEADS)}")
    _require(finetune.head_init in FINETUNE_HEAD_INITS, "eval.finetune.head_init",
             finetune.head_init, f"expected one of {', '.join(FINETUNE_HEAD_INITS)}")
    _require(finetune.head_init != "probe" or finetune.head == "linear",
             "eval.finetune.head_init", finetune.head_init,
             "the probe's weights fit only head='linear'")
