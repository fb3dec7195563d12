"""The shard map of preparation on Apache Beam (the ``[beam]`` extra): DirectRunner on a
laptop, Dataflow, Spark or Flink on a cluster.

`BeamPool` has `ShardPool`'s ``map``: each call runs one Beam pipeline whose workers apply the
function to the shards (a scan, a train sample or one split's serialized windows) and store each
result, pickled, under ``results_dir``; the launching process then reads them back in shard
order, merges the statistics and writes each shard's records to its array_record file
(numbering them: Beam's workers share nothing to count the shards before theirs, which local
workers do and then write their shards themselves). So the files are the same bytes as a
single-process prepare's, whatever the runner. The MEDS root and ``results_dir`` must be paths
every Beam worker reads and writes (a shared or mounted filesystem; ``results_dir`` may also be
a ``gs://`` URL).
"""

from __future__ import annotations

import pickle
import shlex
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import GoogleCloudOptions, PipelineOptions


def _result_path(results_dir: str, index: int) -> str:
    return FileSystems.join(results_dir, f"{index:08d}.pickle")


def _run_and_store(item: tuple[int, Any], fn: Callable[[Any], Any], results_dir: str) -> None:
    """Worker side: (True, fn(item)) for one (index, item), or (False, the error it raised,
    which `BeamPool.map` raises: bad input gets its one-line message), pickled to a file."""
    index, value = item
    try:
        result = (True, fn(value))
    except Exception as error:  # noqa: BLE001 - handed to the launching process as it is
        result = (False, error)
    with FileSystems.create(_result_path(results_dir, index)) as out:
        out.write(pickle.dumps(result, protocol=pickle.HIGHEST_PROTOCOL))


class BeamPool:
    """``map(fn, items)`` -> fn(item) for each item, in order, computed by a Beam pipeline.

    options: Beam pipeline options, as a list or one string of flags (e.g. ``--runner=
    DirectRunner --direct_num_workers=2 --direct_running_mode=multi_processing``).
    default_results_dir: where the workers store their results until read (each map's are
    removed once read) unless the options name a ``--temp_location``.
    """

    def __init__(self, options: str | Sequence[str], default_results_dir: str):
        self.options = PipelineOptions(shlex.split(options) if isinstance(options, str)
                                       else list(options))
        self.results_dir = (self.options.view_as(GoogleCloudOptions).temp_location
                            or default_results_dir)

    def __str__(self) -> str:
        return "on Apache Beam"

    def __enter__(self) -> BeamPool:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        """Nothing to stop: the pipeline has ended when ``map``'s results are read."""

    def offsets(self) -> None:
        """None: Beam's workers share no table to number their shards' records by, so they
        return the records and the launching process numbers and writes them."""
        return None

    def map(self, fn: Callable[[Any], Any], items: Iterable) -> Iterator:
        items = list(items)
        results_dir = FileSystems.join(self.results_dir, uuid.uuid4().hex)
        with beam.Pipeline(options=self.options) as pipeline:
            _ = (pipeline
                 | "Shards" >> beam.Create(list(enumerate(items)))
                 | "Spread" >> beam.Reshuffle()
                 | "Prepare" >> beam.Map(_run_and_store, fn, results_dir))
        try:
            for index in range(len(items)):
                path = _result_path(results_dir, index)
                with FileSystems.open(path) as stored:
                    ok, result = pickle.loads(stored.read())
                FileSystems.delete([path])
                if not ok:
                    raise result
                yield result
        finally:
            if FileSystems.exists(results_dir):
                FileSystems.delete([results_dir])
