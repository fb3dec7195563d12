"""Preparation as Apache Beam pipelines (DirectRunner) writes the single-process files."""

from __future__ import annotations

from pathlib import Path

import pytest

from cvmae_jax.data import meds
from cvmae_jax.data.prepare import prepare_dataset

pytest.importorskip("apache_beam", reason="the [beam] extra is not installed")
from cvmae_jax.data.beam_pool import BeamPool  # noqa: E402

DIRECT = "--runner=DirectRunner --direct_num_workers=2 --direct_running_mode=multi_processing"


def _files(path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(Path(path).iterdir()) if f.is_file()}


def _both(config, tmp_path) -> tuple[dict, dict]:
    """The files of a single-process prepare and of a Beam DirectRunner prepare."""
    local = prepare_dataset(config, None, tmp_path / "local", log=lambda line: None)
    beam = prepare_dataset(config, None, tmp_path / "beam", log=lambda line: None,
                           pool=BeamPool(DIRECT, str(tmp_path / "beam_results")))
    return _files(local.path), _files(beam.path)


def test_beam_prepare_writes_the_single_process_files(tiny_meds, tmp_path):
    local, beam = _both(tiny_meds.config(), tmp_path)
    assert {"data_stats.json", "prepare_report.json"} <= set(local)
    assert beam == local
    assert not list((tmp_path / "beam_results").iterdir())  # every result read and removed


def test_beam_prepare_of_the_shared_sample(shared_meds_dir, tmp_path):
    import ml_collections

    from cvmae_jax.config import default_config

    config = ml_collections.ConfigDict(default_config().data.to_dict())
    config.meds_dir = str(shared_meds_dir)
    config.min_subjects = 1
    local, beam = _both(config, tmp_path)
    assert beam == local


def test_beam_prepare_error_is_the_one_line_error(tiny_meds, tmp_path):
    (tiny_meds.root / "data/train/0.parquet").write_bytes(b"not parquet")
    with pytest.raises(meds.MEDSFormatError, match="0.parquet: unreadable parquet"):
        prepare_dataset(tiny_meds.config(), None, tmp_path / "out", log=lambda line: None,
                        pool=BeamPool(DIRECT, str(tmp_path / "beam_results")))
    assert not (tmp_path / "out").exists()
