"""eval.py's results staged inside the results folder and moved in once complete: what is in
the way is named before anything moves, and a failure leaves the folder as it was."""

import os
import shutil
import socket
import subprocess
from pathlib import Path
from unittest import mock

import pytest

from cvmae_jax.evaluation.staging import (NoRoom, check_room, move_into, remove_interrupted,
                                          staged)


def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _files(folder):
    return {str(p.relative_to(folder)): p.read_text() for p in folder.rglob("*") if p.is_file()}


def test_staged_files_replace_their_namesakes_and_others_stay(tmp_path):
    final = tmp_path / "eval"
    _write(final / "metrics.json", "old")
    _write(final / "notes.txt", "a user's")
    with staged(str(final)) as out:
        _write(Path(out) / "metrics.json", "new")
        _write(Path(out) / "predictions" / "death" / "held_out.parquet", "rows")
        check_room(out, str(final))
        move_into(out, str(final), last=("metrics.json",))
    assert _files(final) == {"metrics.json": "new", "notes.txt": "a user's",
                             "predictions/death/held_out.parquet": "rows"}
    assert sorted(os.listdir(final)) == ["metrics.json", "notes.txt", "predictions"]


def test_the_files_named_last_move_after_all_others(tmp_path):
    staging, final = tmp_path / "staging", tmp_path / "eval"
    for name in ("metrics.json", "report.md", "predictions/death/held_out.parquet"):
        _write(staging / name, "new")
    with mock.patch.object(shutil, "move", wraps=shutil.move) as move:
        move_into(str(staging), str(final), last=("metrics.json",))
    moved = [os.path.relpath(call.args[1], final) for call in move.call_args_list]
    assert sorted(moved) == ["metrics.json", "predictions/death/held_out.parquet", "report.md"]
    assert moved[-1] == "metrics.json"


@pytest.mark.parametrize("in_the_way, message", [
    ("report.md/", "report.md: a folder where eval.py writes a file"),
    ("predictions", "predictions: a file where eval.py writes a folder"),
])
def test_what_is_in_the_way_is_named_and_the_results_wait(tmp_path, in_the_way, message):
    final = tmp_path / "eval"
    final.mkdir()
    if in_the_way.endswith("/"):
        (final / in_the_way).mkdir()
    else:
        (final / in_the_way).write_text("")
    before = _files(final)
    with pytest.raises(NoRoom, match=f"{message}; the finished results wait in ") as error:
        with staged(str(final)) as out:
            _write(Path(out) / "report.md", "new")
            _write(Path(out) / "predictions" / "death" / "held_out.parquet", "rows")
            check_room(out, str(final))
    kept = str(error.value).split("wait in ")[1].split(";")[0]
    assert os.path.basename(kept).startswith(".incomplete-") and os.path.isdir(kept)
    assert {k: v for k, v in _files(final).items() if not k.startswith(".")} == before


def test_a_failure_removes_the_staging_and_a_results_folder_it_made(tmp_path):
    final = tmp_path / "eval"
    with pytest.raises(KeyboardInterrupt):
        with staged(str(final)) as out:
            _write(Path(out) / "metrics.json", "new")
            raise KeyboardInterrupt
    assert not final.exists()


def test_a_write_error_names_the_results_folder_and_leaves_the_earlier_results(tmp_path):
    final = tmp_path / "eval"
    _write(final / "metrics.json", "old")
    with pytest.raises(OSError, match=f"^{final}: could not write the evaluation's results "
                                      r"there: \[Errno 28\] No space left on device$"):
        with staged(str(final)) as out:
            _write(Path(out) / "report.md", "new")
            raise OSError(28, "No space left on device")
    assert _files(final) == {"metrics.json": "old"} and os.listdir(final) == ["metrics.json"]


def test_a_write_error_naming_a_staged_file_names_its_final_path(tmp_path):
    final = tmp_path / "eval"
    with pytest.raises(OSError, match=f"^{final}/predictions/death/held_out.parquet: could not "
                                      "write it: full$"):
        with staged(str(final)) as out:
            raise OSError(f"{out}/predictions/death/held_out.parquet: could not write it: full")
    assert not final.exists()


def test_only_the_staging_folders_of_ended_evaluations_on_this_machine_are_removed(tmp_path):
    final = tmp_path / "eval"
    host = socket.gethostname()
    ended = _ended_pid()
    _write(final / f".incomplete-{host}-{ended}-a1b2" / "embeddings" / "death.parquet", "half")
    _write(final / f".incomplete-{host}-{ended}-c3d4" / ".keep", "")
    _write(final / f".incomplete-{host}-{ended}-e5f6" / "metrics.json", "{}")  # NoRoom's
    _write(final / f".incomplete-{host}-{os.getpid()}-g7h8" / "x", "")  # running now
    _write(final / f".incomplete-other-host-{ended}-i9j0" / "x", "")  # another machine's
    _write(final / ".incomplete-unknown" / "x", "")
    _write(final / f".incomplete-{host}-{ended}-file", "not a folder")
    _write(final / "metrics.json", "the results")
    _write(final / ".notes" / "x", "a user's")
    leftovers = remove_interrupted(str(final), "metrics.json")
    assert leftovers == (2, [str(final / f".incomplete-{host}-{ended}-e5f6")], 3)
    assert sorted(os.listdir(final)) == sorted([
        f".incomplete-{host}-{ended}-e5f6", f".incomplete-{host}-{os.getpid()}-g7h8",
        f".incomplete-other-host-{ended}-i9j0", ".incomplete-unknown",
        f".incomplete-{host}-{ended}-file", "metrics.json", ".notes"])
    assert remove_interrupted(str(tmp_path / "none"), "metrics.json") == (0, [], 0)


def test_a_staging_folder_names_its_machine_and_process(tmp_path):
    with staged(str(tmp_path / "eval")) as out:
        assert os.path.basename(out).startswith(
            f".incomplete-{socket.gethostname()}-{os.getpid()}-")


def _ended_pid():
    """The id of a process that has ended (and was waited for)."""
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def test_a_staging_folder_of_this_host_without_a_pid_is_left_as_it_is(tmp_path):
    """A name that _staging_prefix did not make (no pid between the host and the random part)
    is of unknown origin: left, counted, and no crash reading a pid from it."""
    final = tmp_path / "eval"
    name = f".incomplete-{socket.gethostname()}-notapid-x1y2"
    _write(final / name / "x", "")
    assert remove_interrupted(str(final), "metrics.json") == (0, [], 1)
    assert (final / name).is_dir()


def test_the_staging_folder_of_another_users_process_stays(tmp_path, monkeypatch):
    """os.kill(pid, 0) raises PermissionError for a process of another user: it is alive."""
    final = tmp_path / "eval"
    name = f".incomplete-{socket.gethostname()}-{_ended_pid()}-a1b2"
    _write(final / name / "x", "")

    def kill(pid, signal):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "kill", kill)
    assert remove_interrupted(str(final), "metrics.json") == (0, [], 1)
    assert (final / name).is_dir()
