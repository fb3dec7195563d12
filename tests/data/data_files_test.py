"""Files under data/: symbolic links followed (each real file once), what was read reported."""

import os
import shutil

import pytest

from cvmae_jax.data import meds, report
from cvmae_jax.data.stream import SplitLookup, scan_meds


def _scan(root):
    lines = []
    scan = scan_meds(root, SplitLookup(meds.read_subject_splits(root)), log=lines.append)
    return scan, "\n".join(lines)


def _move_and_link(root, rel, outside):
    """Moves data/<rel> to `outside` and leaves a symbolic link to it in its place."""
    shutil.move(root / "data" / rel, outside)
    os.symlink(outside, root / "data" / rel)


@pytest.fixture
def reference(tiny_meds):
    scan, _ = _scan(tiny_meds.root)
    return scan


def test_a_linked_folder_under_data_is_read(tiny_meds, tmp_path, reference):
    _move_and_link(tiny_meds.root, "train/nested", tmp_path / "elsewhere")
    scan, log = _scan(tiny_meds.root)
    assert scan.splits == reference.splits  # every subject and row, as without the link
    assert scan.files == reference.files
    assert "data/train/nested/1.parquet" in {f["file"] for f in scan.files}
    assert "read 4 files under data/" in log and not scan.warnings


def test_a_linked_split_folder_is_read(tiny_meds, tmp_path, reference):
    _move_and_link(tiny_meds.root, "train", tmp_path / "train")
    scan, _ = _scan(tiny_meds.root)
    assert scan.splits["train"] == reference.splits["train"]
    assert scan.moments.counts() == reference.moments.counts()  # codes to select from
    assert meds.select_lab_codes(scan.moments.counts(), tiny_meds.config())


def test_a_link_loop_and_a_second_name_are_read_once(tiny_meds, reference):
    os.symlink("..", tiny_meds.root / "data/train/nested/up")  # data/train/nested/up -> train
    os.symlink("train", tiny_meds.root / "data/again")
    os.symlink("0.parquet", tiny_meds.root / "data/held_out/copy.parquet")
    found = meds.find_data_files(tiny_meds.root)
    assert len(found.files) == 4
    assert sorted(str(p.relative_to(tiny_meds.root)) for p in found.repeated_links) == [
        "data/again", "data/held_out/copy.parquet", "data/train/nested/up"]
    scan, log = _scan(tiny_meds.root)  # no subject is seen in two shards
    assert scan.splits == reference.splits
    assert "3 symbolic link(s) under data/ lead to a folder or file already read" in log


def test_a_broken_link_is_named(tiny_meds):
    os.symlink("gone.parquet", tiny_meds.root / "data/train/1.parquet")
    with pytest.raises(meds.MEDSFormatError, match=r"data/train/1.parquet: a symbolic link to "
                                                   r"gone.parquet, which does not exist"):
        meds.data_files(tiny_meds.root)


def test_the_files_read_and_subjects_without_rows_are_reported(tiny_meds, reference):
    assert sum(f["rows"] for f in reference.files) == len(tiny_meds.rows)
    assert {f["file"]: f["rows"] for f in reference.files}["data/held_out/0.parquet"] == sum(
        r[0] == 6 for r in tiny_meds.rows)
    text = "\n".join(report.files_lines(dict(files=reference.files, repeated_links=[])))
    assert "| data/train/nested/1.parquet | " in text
    (tiny_meds.root / "data/train/nested/1.parquet").unlink()  # train subjects 3 and 4
    scan, log = _scan(tiny_meds.root)
    assert scan.splits["train"]["subjects_with_rows"] == 3
    assert scan.warnings == ["2 of 5 train subjects of the split list have no rows in the 3 "
                             "files read under data/ (a shard missing or outside data/?); the "
                             "counts are of the subjects read"]
    assert "WARNING: 2 of 5 train subjects" in log
