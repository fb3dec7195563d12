"""Config values are checked before any data is read: each bad value names its field."""

import importlib.util
import os

import pytest

from cvmae_jax.config import default_config
from cvmae_jax.config_checks import check_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("name", ["demo", "meds", "study"])
def test_shipped_configs_pass(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "configs",
                                                                     f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    check_config(module.get_config())


@pytest.mark.parametrize("field, value, message", [
    ("data.lab_code_pattern", "^LAB//(", "not a valid regular expression (missing ), "),
    ("data.top_k", -1, "expected an integer >= 0 (0: every matching code)"),
    ("data.max_len", 0, "expected an integer >= 1"),
    ("data.min_window_len", 300, "must be <= config.data.max_len=256"),
    ("data.window", "first", "expected one of ('chunks', 'last')"),
    ("data.clip_quantiles", (0.999, 0.001), "0 <= low < high <= 1"),
    ("data.clip_quantiles", (0.0, 1.5), "0 <= low < high <= 1"),
    ("data.workers", -2, "expected an integer >= 0"),
    ("masking.strategy", "spans", "expected one of"),
    ("masking.p_high", 1.5, "a masking probability must lie in [0, 1]"),
    ("masking.p_low", -0.1, "a masking probability must lie in [0, 1]"),
    ("masking.threshold_percentile", 120.0, "expected a percentile in [0, 100]"),
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
])
def test_bad_values_name_their_field(field, value, message):
    config = default_config()
    section, name = field.split(".")
    config[section][name] = value
    with pytest.raises(ValueError) as error:
        check_config(config)
    text = str(error.value)
    assert text.startswith("config.") and message in text
    if field != "model.num_heads":  # named with the field it must divide
        assert text.startswith(f"config.{field}={value!r}: ")
