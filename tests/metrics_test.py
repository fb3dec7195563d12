"""Progress lines, metrics.jsonl and TensorBoard: the logged throughput is the window's, the ETA
is paced from the first line (start-up left out), and a resumed run logs each step once."""

import json
import logging
import os
import stat
import time

import pytest

from cvmae_jax.jsonio import UMASK, atomic_path, read_json, write_json_atomic
from cvmae_jax import metrics
from cvmae_jax.metrics import MetricsWriter, Progress, clock


def tensorboard_scalars(logdir):
    """{tag: [(step, value), ...]} as TensorBoard loads the event files in ``logdir`` (its
    purges of the steps a resumed run trains again included)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(logdir), size_guidance={"scalars": 0})  # 0: keep every event
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)]
            for tag in events.Tags()["scalars"]}


def test_progress_shows_the_window_throughput_not_the_run_average():
    progress = Progress(total_steps=1000)
    line = progress.line(100, dict(loss=0.5, steps_per_sec=123.4, tokens_per_sec=5678.0))
    assert "123.40 steps/s 5678 tok/s" in line and line.startswith("step 100/1000 | loss 0.5000")


def test_eta_leaves_start_up_out():
    time.sleep(0.2)  # start-up before the first line (compiling, restoring) must not count
    progress = Progress(total_steps=1000)
    first = progress.line(100, dict(steps_per_sec=100.0))
    assert first.endswith("ETA 0m09s")  # 900 steps at the window's 100 steps/s
    start = progress.first_line[1]
    progress.first_line = (100, start - 5.0)  # 100 more steps took 5 s: 20 steps/s
    later = progress.line(200, dict(steps_per_sec=1000.0))
    assert later.endswith("ETA 0m40s")  # 800 steps at the run's 20 steps/s, not the window's


def test_a_metrics_write_that_fails_names_the_file_and_the_step(tmp_path, monkeypatch):
    path = tmp_path / "metrics.jsonl"
    writer = MetricsWriter(path, start_step=0)

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(metrics, "open", full_disk, raising=False)  # the module's open only
    with pytest.raises(OSError, match=f"^{path}: could not write the metrics of step 5: "
                                      r"\[Errno 28\] No space left on device$"):
        writer.write(dict(step=5, loss=1.0))


def test_resumed_writer_drops_lines_after_the_checkpoint(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    writer = MetricsWriter(path, start_step=0)
    for step in (5, 10, 15):
        writer.write(dict(step=step, loss=1.0 / step))
    writer.write(dict(step=10, split="tuning", masked_mse=0.5))
    with open(path, "a") as f:
        f.write('{"step": 20, "lo')  # killed while writing
    MetricsWriter(path, start_step=10).write(dict(step=15, loss=0.0))
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(r["step"], r.get("split")) for r in lines] == [(5, None), (10, None),
                                                           (10, "tuning"), (15, None)]
    assert lines[-1]["loss"] == 0.0
    with caplog.at_level(logging.WARNING):
        MetricsWriter(path, start_step=0)  # killed before its first checkpoint: starts afresh
    assert path.read_text() == ""
    assert ("metrics.jsonl: dropped 4 line(s) of an earlier run in this workdir that saved no "
            "checkpoint") in caplog.text


def test_clock_shows_hours_from_an_hour_on():
    assert (clock(59.9), clock(3599), clock(16000), clock(float("nan"))) == (
        "0m59s", "59m59s", "4h26m40s", "?")


def test_atomic_files_get_the_usual_permissions(tmp_path):
    write_json_atomic(tmp_path / "a.json", {"x": 1})
    with open(tmp_path / "plain.json", "w") as f:
        f.write("{}")
    mode = stat.S_IMODE(os.stat(tmp_path / "a.json").st_mode)
    assert mode == stat.S_IMODE(os.stat(tmp_path / "plain.json").st_mode) == 0o666 & ~UMASK
    assert mode & stat.S_IRGRP  # not mkstemp's private 0600 (umask 022 here)
    assert json.loads((tmp_path / "a.json").read_text()) == {"x": 1}


def test_an_atomic_write_that_fails_names_the_file_and_leaves_nothing(tmp_path):
    target = tmp_path / "summary.json"
    with pytest.raises(OSError, match=f"^{target}: could not write it: \\[Errno 28\\] No space"):
        with atomic_path(target):
            raise OSError(28, "No space left on device")  # as f.write raises it: no file named
    with pytest.raises(PermissionError, match=f"^{target}: could not write it: "):  # its type
        with atomic_path(target):
            raise PermissionError(13, "Permission denied")
    with pytest.raises(PermissionError) as named:  # an error that names its file is kept
        with atomic_path(target):
            raise PermissionError(13, "Permission denied", "/elsewhere/file")
    assert named.value.filename == "/elsewhere/file"
    assert list(tmp_path.iterdir()) == []


def _refuse(token):
    raise ValueError(f"not strict JSON: {token}")


def test_json_files_and_lines_are_strict_and_read_back(tmp_path):
    record = {"cv": float("inf"), "rows": [{"ratio": float("nan"), "low": -float("inf")}],
              "name": "LAB//x", "step": 3}
    write_json_atomic(tmp_path / "m.json", record)
    strict = json.loads((tmp_path / "m.json").read_text(), parse_constant=_refuse)
    assert strict["cv"] == "inf" and strict["rows"][0] == {"ratio": "nan", "low": "-inf"}
    back = read_json(tmp_path / "m.json")
    assert back["cv"] == float("inf") and back["rows"][0]["low"] == -float("inf")
    assert back["rows"][0]["ratio"] != back["rows"][0]["ratio"] and back["name"] == "LAB//x"
    MetricsWriter(tmp_path / "metrics.jsonl", start_step=0).write(dict(step=3, loss=float("nan")))
    line = json.loads((tmp_path / "metrics.jsonl").read_text(), parse_constant=_refuse)
    assert line == {"step": 3, "loss": "nan"}


def test_tensorboard_shows_a_resumed_runs_steps_once(tmp_path):
    """A resumed run (here within the same second) retrains the steps after its checkpoint:
    TensorBoard shows its values for them, the first run's for the steps before."""
    first = MetricsWriter(tmp_path / "metrics.jsonl", 0, tensorboard_dir=tmp_path)
    for step in (5, 10, 15):
        first.write(dict(step=step, loss=float(step), steps_per_sec=2.5))
    first.write(dict(step=10, split="tuning", masked_mse=0.5, num_masked=7, note="text"))
    first.close()
    resumed = MetricsWriter(tmp_path / "metrics.jsonl", 10, tensorboard_dir=tmp_path)
    resumed.write(dict(step=15, loss=-15.0, steps_per_sec=2.5))
    resumed.close()
    shown = tensorboard_scalars(tmp_path)
    assert sorted(shown) == ["train/loss", "train/steps_per_sec", "tuning/masked_mse",
                             "tuning/num_masked"]
    assert shown["train/loss"] == [(5, 5.0), (10, 10.0), (15, -15.0)]
    assert shown["tuning/num_masked"] == [(10, 7.0)]


def test_a_countdown_logs_rate_and_eta_only_for_a_long_loop(caplog):
    from cvmae_jax import metrics

    now = [100.0]
    with caplog.at_level("INFO"):
        quick = metrics.Countdown("quick", 10, "passes", timer=lambda: now[0])
        for _ in range(10):
            now[0] += 1.0
            quick.advance()
        slow = metrics.Countdown("eval single-code", 100, "passes", timer=lambda: now[0])
        for _ in range(100):
            now[0] += 1.0
            slow.advance()
    assert caplog.messages == [f"eval single-code: {done}/100 passes, 1.0 passes/s, ETA "
                               f"{metrics.clock(100 - done)}" for done in (30, 60, 90)]
