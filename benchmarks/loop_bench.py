"""Time the training loop against its compiled step alone, on a host-bound tiny config.

    python -m benchmarks.loop_bench [--steps=400 --rounds=3 --log_every=50 --json=out.json]

"loop": ``train_and_evaluate`` on synthetic MEDS data (d_model 32, one layer, 32 events, batch
16: a step of about a millisecond on a CPU, so the host's work per step shows). Its steps/s are
metrics.jsonl's ``steps_per_sec`` (training time only: compiling, evaluating and saving are
left out), the median over each round's windows after the first.

"step alone": the same body (``steps.make_train_step``), model, data and launcher
(``compile_train_step``), called back to back on one batch already on the device, waiting
once per round: the ceiling the loop approaches.

Rounds alternate loop and step (a shared machine's load hits both alike); each line reports the
medians over rounds and the loop's overhead per step, 1/loop - 1/step, with the share of the
loop's time it spent waiting for the input pipeline (``data_wait_fraction``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp

from benchmarks import common
from cvmae_jax import parallel, run_setup
from cvmae_jax.config import default_config
from cvmae_jax.data.pipeline import train_dataset
from cvmae_jax.masking import mask_root
from cvmae_jax.model import ModelConfig
from cvmae_jax.steps import init_state, make_optimizer, make_train_step
from cvmae_jax.train import train_and_evaluate


def tiny_config(data_dir: str, steps: int, log_every: int):
    """The tests' tiny run: evaluation and checkpoints only after the last step."""
    config = default_config()
    config.data.data_dir = data_dir
    config.data.synthetic_subjects = 60
    config.data.max_len, config.data.top_k = 32, 40
    config.model.d_model, config.model.num_heads, config.model.num_layers = 32, 4, 1
    config.model.time_frequencies = 4
    config.train.update(dict(batch_size=16, num_steps=steps, warmup_steps=5,
                             log_every=log_every, eval_every=steps, checkpoint_every=steps,
                             compilation_cache_dir=""))
    config.eval.batch_size = 32
    return config


def loop_round(config, workdir: str) -> dict:
    """One fresh run; steps/s and data wait of its windows after the first (warm-up)."""
    train_and_evaluate(config, workdir)
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        windows = [m for m in map(json.loads, f) if "split" not in m][1:]
    return dict(steps_per_sec=statistics.median(m["steps_per_sec"] for m in windows),
                data_wait_fraction=statistics.median(m["data_wait_fraction"] for m in windows))


class StepAlone:
    """The loop's compiled step on one device-resident batch, its state leaves donated."""

    def __init__(self, config, workdir: str):
        dataset = run_setup.prepare_run_data(config, workdir)
        launcher = parallel.make_launcher(config.parallel)
        optimizer = make_optimizer(config.train)
        graphdef, state = init_state(
            ModelConfig.from_config(config.model, dataset.stats.vocab_size), optimizer,
            config.seed)
        body = make_train_step(graphdef, optimizer,
                               jnp.asarray(run_setup.mask_probabilities(config, dataset)),
                               mask_root(config.seed), config.loss.unmasked_weight,
                               launcher.axis_name)
        data = iter(train_dataset(dataset, "train", config.train.batch_size,
                                  config.data.max_len, seed=config.seed))
        local_batch = next(data)
        data.close()
        state = launcher.put_state(state)
        self.compiled = launcher.compile_train_step(body, state, local_batch)
        self.leaves = self.compiled.flatten(state)
        self.batch = self.compiled.put(local_batch)

    def steps_per_sec(self, steps: int) -> float:
        def launch(_):
            self.leaves, metrics = self.compiled(self.leaves, self.batch)
            return metrics

        return 1.0 / common.time_pipelined(launch, steps, wait=jax.block_until_ready)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=common.count_arg(2), default=400,
                        help="steps per round (loop and step alone)")
    parser.add_argument("--rounds", type=common.count_arg(1), default=3)
    parser.add_argument("--log_every", type=common.count_arg(1), default=50,
                        help="the loop's config.train.log_every")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write results here")
    args = parser.parse_args()
    if args.steps < 2 * args.log_every:
        common.usage_error(f"--steps={args.steps} gives fewer than two windows of "
                           f"--log_every={args.log_every} (the first is left out)")
    with tempfile.TemporaryDirectory() as tmp:
        config = tiny_config(os.path.join(tmp, "data"), args.steps, args.log_every)
        common.progress("preparing the data and compiling the step alone")
        step = StepAlone(config, os.path.join(tmp, "setup"))
        step.steps_per_sec(20)  # warm-up
        loops, alone = [], []
        for i in range(args.rounds):
            common.progress(f"round {i + 1}/{args.rounds}")
            loops.append(loop_round(config, os.path.join(tmp, f"run{i}")))
            alone.append(step.steps_per_sec(args.steps))
    loop = statistics.median(r["steps_per_sec"] for r in loops)
    wait = statistics.median(r["data_wait_fraction"] for r in loops)
    ceiling = statistics.median(alone)
    overhead_ms = 1e3 * (1.0 / loop - 1.0 / ceiling)
    print(f"step alone: {ceiling:.1f} steps/s ({1e3 / ceiling:.2f} ms/step)")
    print(f"loop:       {loop:.1f} steps/s ({1e3 / loop:.2f} ms/step; "
          f"data wait {100 * wait:.0f}% of it)")
    print(f"loop overhead: {overhead_ms:.2f} ms/step; loop/step = {loop / ceiling:.2f}")
    common.write_json(args.json, dict(
        machine=common.machine_info(), args=vars(args), time=time.strftime("%Y-%m-%d %H:%M"),
        step_alone_steps_per_sec=alone, loop_rounds=loops, loop_steps_per_sec=loop,
        data_wait_fraction=wait, overhead_ms_per_step=overhead_ms,
        loop_over_step=loop / ceiling, devices=jax.device_count()))


if __name__ == "__main__":
    main()
