"""Batches/s the input pipeline delivers vs the batches/s the train step consumes.

    python -m benchmarks.pipeline_bench [--subjects=1000 --batches=200 --data_dir=DIR]
    python -m benchmarks.pipeline_bench --packing [--meds_dir=MEDS --no_step]
    python -m benchmarks.pipeline_bench --workers=0,4,8 --dtype=bfloat16 --attention=cudnn

--workers times each given ``config.data.workers`` (worker processes reading or packing
batches; 0: one thread of this process). With --packing it also reads packed batches (``data.packing=True``) and prints the share of real
tokens in both layouts; --meds_dir reads a MEDS root instead of the synthetic default.

Builds (or reuses, under --data_dir) the synthetic MEDS default prepared like ``train.py`` does,
reads ``cvmae_jax.data.pipeline.train_dataset`` batches at the default batch size, then times the
default-config step (``step_bench.JaxStep``, in --dtype with --attention) for comparison. The pipeline runs alone here; in
training it shares the cores with the step.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

from benchmarks import common
from benchmarks.step_bench import JaxStep, add_attention_arg
from cvmae_jax.config import default_config
from cvmae_jax.data.packing import packed_train_dataset
from cvmae_jax.data.pipeline import train_dataset
from cvmae_jax.data.prepare import prepare_dataset
from cvmae_jax.data.synthetic import synthetic_meds_root


def prepared(data_dir: str, subjects: int, meds_dir: str | None = None):
    config = default_config()
    meds_dir = meds_dir or synthetic_meds_root(data_dir, subjects, seed=0, log=common.progress)
    common.progress("preparing (reused when present)")
    return config, prepare_dataset(config.data, meds_dir, os.path.join(data_dir, "prepared"),
                                   log=lambda m: None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--subjects", type=common.count_arg(1), default=1000,
                        help="synthetic subjects (without --meds_dir)")
    parser.add_argument("--batches", type=common.count_arg(1), default=200,
                        help="timed batches per layout and worker count")
    parser.add_argument("--data_dir", default=None, help="keep the data here (default: temp)")
    parser.add_argument("--json", default=None, metavar="PATH")
    parser.add_argument("--packing", action="store_true", help="also read packed batches")
    parser.add_argument("--meds_dir", default=None, help="a MEDS root instead of synthetic data")
    parser.add_argument("--no_step", action="store_true", help="skip timing the train step")
    parser.add_argument("--workers", default="0", help="comma-separated config.data.workers "
                        "counts (each >= 0)")
    parser.add_argument("--dtype", default="float32", choices=common.DTYPES,
                        help="compute dtype of the step timed for comparison")
    add_attention_arg(parser)
    args = parser.parse_args()
    try:
        worker_counts = [common.count_arg(0)(w) for w in args.workers.split(",")]
    except argparse.ArgumentTypeError as error:
        parser.error(f"--workers={args.workers}: {error}")
    if common.reuse_freed_memory():  # as train.py: the step timed below runs as it does there
        common.HOST_MALLOC = "reuse freed memory (cvmae_jax.host_memory)"
    if not args.no_step:
        common.check_attention_here(args.attention, args.dtype)
    layouts = {"padded": train_dataset, "packed": packed_train_dataset}
    if not args.packing:
        del layouts["packed"]
    rates, shares = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        try:
            config, dataset = prepared(args.data_dir or tmp, args.subjects, args.meds_dir)
        except (ValueError, OSError) as error:  # MEDSFormatError is a ValueError
            common.usage_error(f"--meds_dir / --data_dir: {error}")
        batch_size, max_len = config.train.batch_size, config.data.max_len
        for workers in worker_counts:
            for name, make in layouts.items():
                data = iter(make(dataset, "train", batch_size, max_len, seed=0, workers=workers))
                for _ in range(2 * workers + 1):  # until every worker process has started
                    next(data)
                start = time.perf_counter()
                tokens = sum(int(next(data)["valid"].sum()) for _ in range(args.batches))
                rate = rates[f"{name} workers={workers}"] = args.batches / (
                    time.perf_counter() - start)
                shares[f"{name} workers={workers}"] = tokens / args.batches / (
                    batch_size * max_len)
                data.close()
                print(f"{name:6s} workers={workers:<3d} pipeline {rate:8.1f} batches/s  "
                      f"({batch_size} x {max_len}; real tokens "
                      f"{tokens / args.batches / (batch_size * max_len):.3f} of the slots over "
                      f"{args.batches} batches)")
    print(f"machine: {common.machine_info()}")
    if args.no_step:
        return
    common.progress("timing the default step")
    cfg = common.BenchConfig(batch=batch_size, seq=max_len)
    runner = JaxStep(cfg, args.dtype, attention=args.attention)
    runner.compile()
    common.time_calls(runner.step, cfg.warmup)
    step_s = runner.pipelined_s(cfg.steps)
    print(f"step               {1 / step_s:8.1f} batches/s  (default config, {args.dtype}, "
          f"{args.attention} attention, {cfg.steps} steps launched back to back)")
    for name, rate in rates.items():
        print(f"pipeline / step = {rate * step_s:6.1f}x  ({name})")
    common.write_json(args.json, dict(machine=common.machine_info(), config=vars(args),
                                      pipeline_batches_per_s=rates, real_token_share=shares,
                                      step_batches_per_s=1 / step_s, batch_size=batch_size,
                                      max_len=max_len))


if __name__ == "__main__":
    main()
