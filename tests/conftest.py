"""Test setup: 8 fake CPU devices (set before jax is imported) and shared fixtures."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pathlib  # noqa: E402

import pytest  # noqa: E402

from cvmae_jax.config import load_config_file  # noqa: E402

SHARED_MEDS = pathlib.Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / \
    "mimic_iv_demo_meds"


@pytest.fixture(scope="session")
def shared_meds_dir():
    """The real MIMIC-IV demo sample in ../shared, or a clean skip when it is absent."""
    if not (SHARED_MEDS / "metadata" / "subject_splits.parquet").exists():
        pytest.skip(f"shared MEDS sample not found at {SHARED_MEDS}")
    return SHARED_MEDS.resolve()


def _load_shipped_config(name: str):
    """configs/<name>.py's get_config()."""
    return load_config_file(str(pathlib.Path(__file__).resolve().parents[1] / "configs"
                                / f"{name}.py"))


@pytest.fixture(scope="session")
def shipped_config():
    """Loads a shipped config by name: ``shipped_config("demo")`` -> configs/demo.py's."""
    return _load_shipped_config


@pytest.fixture(scope="session", autouse=True)
def digest_cache_of_the_tests(tmp_path_factory):
    """The MEDS file digests (data/meds_identity.py) cached in a folder of the tests' own
    (``XDG_CACHE_HOME``, inherited by the commands tests run), not in the user's ~/.cache."""
    previous = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("cache_home"))
    yield
    if previous is None:
        del os.environ["XDG_CACHE_HOME"]
    else:
        os.environ["XDG_CACHE_HOME"] = previous
