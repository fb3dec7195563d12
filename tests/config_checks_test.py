"""Config values are checked before any data is read: each bad value names its field."""

import logging

import pytest

from cvmae_jax.config import default_config
from cvmae_jax.config_checks import check_config, config_warnings
from cvmae_jax.run_setup import changed_settings, validate_config



@pytest.mark.parametrize("name", ["demo", "meds", "study"])
def test_shipped_configs_pass(name, shipped_config):
    check_config(shipped_config(name))
    assert config_warnings(shipped_config(name)) == []


@pytest.mark.parametrize("field, value, message", [
    ("seed", -1, "expected an integer in [0, 2**32)"),
    ("seed", True, "expected an integer in [0, 2**32)"),
    ("data.synthetic_seed", 2 ** 32, "expected an integer in [0, 2**32)"),
    ("eval.mask_seed", -1, "expected an integer in [0, 2**32)"),
    ("eval.sample_seed", 2 ** 40, "expected an integer in [0, 2**32)"),
    ("data.lab_code_pattern", "^LAB//(", "not a valid regular expression (missing ), "),
    ("data.top_k", -1, "expected an integer >= 0 (0: every matching code)"),
    ("data.max_len", 0, "expected an integer >= 1"),
    ("data.min_window_len", 300, "must be <= config.data.max_len=256"),
    ("data.window", "first", "expected one of ('chunks', 'last')"),
    ("data.meds_dir", "gs://bucket/MEDS", "a URL; this tool reads and writes local paths: "
                                          "mount the bucket (Cloud Storage FUSE, "),
    ("data.data_dir", "s3://bucket/prepared", "a URL; this tool reads and writes local paths"),
    ("data.clip_quantiles", (0.999, 0.001), "0 <= low < high <= 1"),
    ("data.clip_quantiles", (0.0, 1.5), "0 <= low < high <= 1"),
    ("data.workers", -2, "expected an integer >= 0"),
    ("data.min_subjects", 0, "expected an integer >= 1"),
    ("data.lab_codes", ("(LAB//50912//mg/dL,)",), "a tuple typed on the command line needs "
                                                  "quotes, --config.data.lab_codes='(\"LAB//"),
    ("masking.strategy", "spans", "expected one of"),
    ("masking.p_high", 1.5, "a masking probability must lie in [0, 1]"),
    ("masking.p_low", -0.1, "a masking probability must lie in [0, 1]"),
    ("masking.threshold_percentile", 120.0, "expected a percentile in [0, 100]"),
    ("masking.p_low", 0.9, "must be <= config.masking.p_high=0.8 (p_high is the probability "
                           "of the high tier; swapped, the tiers would be inverted)"),
    ("model.num_heads", 3, "config.model.d_model=128: must be divisible by "
                           "config.model.num_heads=3"),
    ("model.num_layers", 0, "expected an integer >= 1"),
    ("model.dtype", "float64", "expected one of ('float32', 'bfloat16', 'float16')"),
    ("loss.unmasked_weight", -1.0, "expected >= 0"),
    ("train.num_steps", 0, "expected an integer >= 1"),
    ("train.learning_rate", 0.0, "expected > 0"),
    ("train.log_every", 0, "expected an integer >= 1"),
    ("train.transfer_guard", "disalow", "expected one of ('allow', 'log', 'disallow'"),
    ("eval.mask_rate", 0.0, "expected a rate in (0, 1]"),
    ("eval.label_window", "latest", "expected one of last_events, each_code_latest"),
    ("eval.split", "validation", "expected one of train, tuning, held_out"),
    ("eval.labels_dir", "gs://bucket/labels", "a URL; this tool reads and writes local paths"),
    ("eval.finetune.head", "mlpp", "expected one of linear, mlp"),
    ("eval.finetune.steps", 0, "expected an integer >= 1"),
    ("eval.finetune.head_init", "probe_weights", "expected one of zero, probe"),
    ("parallel.mode", "pjit", "expected one of ('jit', 'pmap')"),
    ("parallel.cpu_devices", -2, "expected an integer >= 0 (0: JAX's default, 1)"),
    ("parallel.num_devices", -1, "expected an integer >= 0 (0: all devices)"),
])
def test_bad_values_name_their_field(field, value, message):
    config = default_config()
    _set(config, field, value)
    with pytest.raises(ValueError) as error:
        check_config(config)
    text = str(error.value)
    assert text.startswith("config.") and message in text
    if field != "model.num_heads":  # named with the field it must divide
        assert text.startswith(f"config.{field}={value!r}: ")


def test_a_config_not_built_on_the_defaults_is_refused_naming_what_it_lacks():
    config = default_config()
    del config["masking"], config["seed"]
    with pytest.raises(ValueError, match=r"^the config lacks masking, seed: build get_config\(\) "
                                         r"on cvmae_jax.config.default_config\(\)"):
        check_config(config)


def test_a_field_the_defaults_lack_is_refused_with_the_closest_name(shipped_config):
    """A config file that misspells a field (``c.train.num_step = 5``) would otherwise train
    with the default; the study's own section is checked too."""
    config = shipped_config("study")
    check_config(config)
    config.study.seed = 5
    with pytest.raises(ValueError, match=r"^config.study.seed: no such config field .*did you "
                                         r"mean config.study.seeds\?$"):
        check_config(config)
    del config.study["seed"]
    config.train.num_step = 5
    config.model.dmodel = 64
    with pytest.raises(ValueError, match=r"^config.model.dmodel: no such config field \(set by "
                                         r"the config file; the fields are cvmae_jax/config.py's"
                                         r"\); did you mean config.model.d_model\? \(1 more "
                                         r"unknown: config.train.num_step\)$"):
        check_config(config)


def test_pmap_on_several_processes_is_refused_before_the_devices_start():
    config = default_config()
    config.parallel.mode, config.parallel.num_processes = "pmap", 2
    with pytest.raises(ValueError, match=r"^config.parallel.mode='pmap': pmap runs on one "
                                         r"process, and config.parallel.num_processes=2"):
        check_config(config)


@pytest.mark.parametrize("fields, message", [
    ({"train.warmup_steps": 1000, "train.num_steps": 200},
     "config.train.warmup_steps=1000 >= config.train.num_steps=200: the learning rate rises for "
     "the whole run and never reaches config.train.learning_rate="),
    ({"train.warmup_steps": 200, "train.num_steps": 200},
     "config.train.warmup_steps=200 >= config.train.num_steps=200"),
    ({"train.checkpoint_every": 500, "train.num_steps": 200},
     "config.train.checkpoint_every=500 > config.train.num_steps=200: only the last step is "
     "saved"),
    ({"masking.p_high": 0.3, "masking.p_low": 0.3},
     "config.masking.p_high = config.masking.p_low = 0.3: both tiers mask alike, so strategy "
     "'cv' is uniform masking"),
    ({"masking.threshold_percentile": 100.0},
     "config.masking.threshold_percentile=100.0: no code lies above it, so every code gets "
     "config.masking.p_low=0.2 (uniform masking)"),
    ({"masking.strategy": "cv_within", "masking.threshold_percentile": 100.0},
     "config.masking.threshold_percentile=100.0: no code lies above it"),
])
def test_settings_that_run_but_mislead_are_warned_about(fields, message, caplog):
    config = default_config()
    for field, value in fields.items():
        section, name = field.split(".")
        config[section][name] = value
    assert [w for w in config_warnings(config) if w.startswith(message)], config_warnings(config)
    with caplog.at_level(logging.WARNING):
        validate_config(config, num_devices=1)  # what train.py logs once the devices are up
    assert [r for r in caplog.records if r.getMessage().startswith(message)]


@pytest.mark.parametrize("fields", [
    {"data.max_len": 64, "data.min_window_len": 64}, {"eval.mask_rate": 1.0},
    {"masking.p_high": 1.0, "masking.p_low": 0.0}, {"seed": 2 ** 32 - 1},
])
def test_values_at_their_limits_pass(fields):
    config = default_config()
    for field, value in fields.items():
        _set(config, field, value)
    check_config(config)


@pytest.mark.parametrize("field, value, refused", [
    ("seed", 1, True), ("loss.unmasked_weight", 0.5, True), ("data.top_k", 50, True),
    ("data.packing", True, True), ("masking.p_high", 0.9, True), ("model.d_model", 64, True),
    ("train.learning_rate", 3e-3, True), ("train.num_steps", 100, True),
    ("train.log_every", 7, False), ("train.checkpoint_every", 70, False),
    ("eval.batch_size", 8, False), ("parallel.mode", "pmap", False),
    ("model.attention", "cudnn", False), ("data.meds_dir", "/elsewhere", False),
    ("data.workers", 2, False),
])
def test_a_resume_refuses_exactly_the_settings_that_change_results(field, value, refused):
    saved, config = default_config().to_dict(), default_config()
    _set(config, field, value)
    assert bool(changed_settings(saved, config)) == refused


def _set(config, field: str, value) -> None:
    """config.<field> = value for a dotted field name, checking that the value is new."""
    *sections, name = field.split(".")
    for part in sections:
        config = config[part]
    assert config[name] != value
    config[name] = value


def test_a_finetune_batch_the_devices_cannot_split_is_refused_before_training():
    config = default_config()
    config.train.batch_size = config.eval.batch_size = 8
    config.eval.finetune.batch_size = 6
    with pytest.raises(ValueError, match=r"config.eval.finetune.batch_size=6 must be divisible "
                                         r"by the number of devices \(4\)"):
        validate_config(config, num_devices=4)
    config.eval.finetune.enabled = False  # eval.py fine-tunes nothing: no batch to split
    validate_config(config, num_devices=4)
