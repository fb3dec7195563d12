"""Time the training loop against its compiled step alone, on a host-bound tiny config.

    python -m benchmarks.loop_bench [--steps=400 --rounds=3 --log_every=50 --json=out.json]
    python -m benchmarks.loop_bench --cached_batches   # the loop without input pipeline work

"loop": ``train_and_evaluate`` on synthetic MEDS data (d_model 32, one layer, 32 events, batch
16: a step of about a millisecond on a CPU, so the host's work per step shows). Its steps/s are
metrics.jsonl's ``steps_per_sec`` (training time only: compiling, evaluating and saving are
left out), the median over each round's windows after the first.

"step alone": the same body (``steps.make_train_step``), model, data and launcher
(``compile_train_step``), called back to back on one batch already on the device, waiting
once per round: the ceiling the loop approaches.

Rounds alternate loop and step (a shared machine's load hits both alike); the lines report the
medians over rounds and the loop's overhead per step, 1/loop - 1/step, with the share of the
loop's time it spent waiting for the input pipeline (``data_wait_fraction``). Other processes'
load moves wall times a lot on a small shared machine, so each also reports this process's CPU
time per step (all its threads: the input pipeline's too): for the loop, a run's CPU time less
that of a run of two windows (set-up, compiling, evaluating and saving), over the extra steps.
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

import cvmae_jax.train as train_module
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


class CachedBatches:
    """``train_dataset``'s first batches cycled, so the loop measures no input pipeline work;
    checkpointable (the underlying iterator's state) like grain's iterator."""

    def __init__(self, dataset, count: int = 8):
        self.iterator = iter(dataset)
        self.batches = [next(self.iterator) for _ in range(count)]
        self.index = 0

    def __iter__(self):
        return self

    def __next__(self):
        self.index += 1
        return self.batches[self.index % len(self.batches)]

    def get_state(self):
        return self.iterator.get_state()

    def set_state(self, state):
        self.iterator.set_state(state)

    def close(self):
        self.iterator.close()


def use_cached_batches() -> None:
    """Training runs read ``CachedBatches`` instead of the input pipeline."""
    real = train_module.train_dataset
    train_module.train_dataset = lambda *args, **kwargs: CachedBatches(real(*args, **kwargs))


def loop_round(config, workdir: str) -> dict:
    """One fresh run: steps/s and data wait of its windows after the first (warm-up), and the
    process's CPU seconds for the whole run."""
    cpu_start = time.process_time()
    train_and_evaluate(config, workdir)
    cpu_s = time.process_time() - cpu_start
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        windows = [m for m in map(json.loads, f) if "split" not in m][1:]
    return dict(steps_per_sec=statistics.median(m["steps_per_sec"] for m in windows),
                data_wait_fraction=statistics.median(m["data_wait_fraction"] for m in windows),
                cpu_s=cpu_s)


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

    def run(self, steps: int) -> dict:
        """Steps/s and CPU ms per step of ``steps`` steps launched back to back."""
        def launch(_):
            self.leaves, metrics = self.compiled(self.leaves, self.batch)
            return metrics

        cpu_start = time.process_time()
        seconds = common.time_pipelined(launch, steps, wait=jax.block_until_ready)
        return dict(steps_per_sec=1.0 / seconds,
                    cpu_ms_per_step=1e3 * (time.process_time() - cpu_start) / steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=common.count_arg(2), default=400,
                        help="steps per round (loop and step alone)")
    parser.add_argument("--rounds", type=common.count_arg(1), default=3)
    parser.add_argument("--log_every", type=common.count_arg(1), default=50,
                        help="the loop's config.train.log_every")
    parser.add_argument("--cached_batches", action="store_true",
                        help="the loop cycles 8 batches read once: its overhead without the "
                             "input pipeline's work")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write results here")
    args = parser.parse_args()
    if args.steps < 4 * args.log_every:
        common.usage_error(f"--steps={args.steps} gives fewer than four windows of "
                           f"--log_every={args.log_every} (the CPU time is measured over the "
                           "steps after two)")
    if args.cached_batches:
        use_cached_batches()
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = os.path.join(tmp, "data")
        config = tiny_config(data_dir, args.steps, args.log_every)
        fixed = tiny_config(data_dir, 2 * args.log_every, args.log_every)
        common.progress("preparing the data and compiling the step alone")
        step = StepAlone(config, os.path.join(tmp, "setup"))
        step.run(20)  # warm-up
        loops, alone, fixed_cpu = [], [], []
        for i in range(args.rounds):
            common.progress(f"round {i + 1}/{args.rounds}")
            fixed_cpu.append(loop_round(fixed, os.path.join(tmp, f"fixed{i}"))["cpu_s"])
            loops.append(loop_round(config, os.path.join(tmp, f"run{i}")))
            alone.append(step.run(args.steps))
    extra_steps = args.steps - 2 * args.log_every
    for r, cpu in zip(loops, fixed_cpu):
        r["cpu_ms_per_step"] = 1e3 * (r["cpu_s"] - cpu) / extra_steps
    loop, ceiling = (statistics.median(r["steps_per_sec"] for r in loops),
                     statistics.median(r["steps_per_sec"] for r in alone))
    loop_cpu, alone_cpu = (statistics.median(r["cpu_ms_per_step"] for r in loops),
                           statistics.median(r["cpu_ms_per_step"] for r in alone))
    wait = statistics.median(r["data_wait_fraction"] for r in loops)
    overhead_ms = 1e3 * (1.0 / loop - 1.0 / ceiling)
    print(f"step alone: {ceiling:.1f} steps/s ({1e3 / ceiling:.2f} ms/step), "
          f"{alone_cpu:.2f} CPU ms/step")
    print(f"loop:       {loop:.1f} steps/s ({1e3 / loop:.2f} ms/step; data wait {100 * wait:.0f}%"
          f" of it), {loop_cpu:.2f} CPU ms/step")
    print(f"loop overhead: {overhead_ms:.2f} ms/step, {loop_cpu - alone_cpu:.2f} CPU ms/step; "
          f"loop/step = {loop / ceiling:.2f}")
    common.write_json(args.json, dict(
        machine=common.machine_info(), args=vars(args), time=time.strftime("%Y-%m-%d %H:%M"),
        step_alone_rounds=alone, loop_rounds=loops, fixed_run_cpu_s=fixed_cpu,
        loop_steps_per_sec=loop, step_alone_steps_per_sec=ceiling, data_wait_fraction=wait,
        overhead_ms_per_step=overhead_ms, loop_cpu_ms_per_step=loop_cpu,
        step_alone_cpu_ms_per_step=alone_cpu, loop_over_step=loop / ceiling,
        devices=jax.device_count()))

if __name__ == "__main__":
    main()
