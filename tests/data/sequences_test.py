"""Cutting subjects' lab events into windows: chunks and last, ids, times, values, counts."""

import numpy as np
import pyarrow as pa
import pytest

from cvmae_jax.data.sequences import build_examples

from meds_reference import compute_stats, read_numeric_events


@pytest.fixture
def train_and_stats(tiny_meds):
    train = read_numeric_events(tiny_meds.root, "train")
    return train, compute_stats(train, [tiny_meds.A, tiny_meds.B, tiny_meds.D], (0.001, 0.999))


def _lab_events_per_subject(events, stats):
    codes = events["code"].to_pylist()
    subjects = events["subject_id"].to_pylist()
    out = {}
    for s, c in zip(subjects, codes):
        out[s] = out.get(s, 0) + (c in stats.codes)
    return out


def test_chunks_cover_every_event_in_order(train_and_stats):
    train, stats = train_and_stats
    report = {}
    examples = list(build_examples(train, stats, max_len=8, window="chunks", min_window_len=1,
                                   report=report))
    per_subject = _lab_events_per_subject(train, stats)
    expected = [min(8, n - lo) for s, n in sorted(per_subject.items()) for lo in range(0, n, 8)]
    assert [len(ex["codes"]) for ex in examples] == expected
    assert [int(ex["example_id"]) for ex in examples] == list(range(len(examples)))
    keys = [(int(ex["subject_id"]), int(ex["start_time_us"])) for ex in examples]
    assert keys == sorted(keys)
    assert report["examples"] == len(examples) and report["tokens"] == sum(expected)
    assert report["out_of_vocab_events"] == train.num_rows - sum(expected)
    for ex in examples:
        assert ex["times"].dtype == np.float32 and ex["codes"].dtype == np.int32
        assert ex["values"].dtype == np.float32 and ex["example_id"].dtype == np.int64
        assert ex["times"][0] == 0 and np.all(np.diff(ex["times"]) >= 0)
        span_h = (ex["end_time_us"] - ex["start_time_us"]) / 3.6e9
        np.testing.assert_allclose(ex["times"][-1], span_h, rtol=1e-6)


def test_values_are_normalized_raw_values(train_and_stats, tiny_meds):
    train, stats = train_and_stats
    (ex,) = [e for e in build_examples(train, stats, 100, "chunks", 2) if e["subject_id"] == 3]
    raw = stats.denormalize(ex["codes"], ex["values"])
    a = raw[ex["codes"] == 0]
    np.testing.assert_allclose(np.sort(a), np.sort(np.clip(
        [r[3] for r in tiny_meds.rows if r[0] == 3 and r[2] == tiny_meds.A and np.isfinite(r[3])],
        stats.clip_low[0], stats.clip_high[0])), rtol=1e-5)


def test_last_keeps_most_recent_events(train_and_stats):
    train, stats = train_and_stats
    chunks = list(build_examples(train, stats, 1000, "chunks", 2))
    report = {}
    last = list(build_examples(train, stats, 4, "last", 2, report=report))
    assert len(last) == len(chunks)  # one window per subject
    for full, ex in zip(chunks, last):
        assert ex["subject_id"] == full["subject_id"] and len(ex["codes"]) == 4
        np.testing.assert_array_equal(ex["codes"], full["codes"][-4:])
        np.testing.assert_array_equal(ex["values"], full["values"][-4:])
        assert ex["end_time_us"] == full["end_time_us"] and ex["times"][0] == 0
    assert report["events_not_in_window"] == sum(len(e["codes"]) - 4 for e in chunks)


def test_short_windows_are_dropped(train_and_stats):
    train, stats = train_and_stats
    report = {}
    examples = list(build_examples(train, stats, 8, "chunks", 8, report=report))
    assert all(len(ex["codes"]) == 8 for ex in examples)
    assert report["short_windows_dropped"] == 5  # each subject's remainder
    left_out = (sum(_lab_events_per_subject(train, stats).values())
                - sum(len(ex["codes"]) for ex in examples))  # the dropped remainders' events
    assert left_out > 0 and report["events_not_in_window"] == left_out


def test_unsorted_input_is_sorted_by_subject_and_time(train_and_stats):
    train, stats = train_and_stats
    shuffled = train.take(pa.array(np.random.default_rng(0).permutation(train.num_rows)))
    a = list(build_examples(train, stats, 1000, "chunks", 2))
    b = list(build_examples(shuffled, stats, 1000, "chunks", 2))
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x["times"], y["times"])
        assert x["start_time_us"] == y["start_time_us"]


def test_bad_window_is_rejected(train_and_stats):
    with pytest.raises(ValueError, match="window"):
        next(build_examples(*train_and_stats, 8, "middle", 2))
