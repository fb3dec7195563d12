"""Time the project's compiled VO-MAE train step on synthetic batches.

    python -m benchmarks.step_bench --config=default [--d_model=... --steps=30 --json=out.json]
    python -m benchmarks.step_bench --config=default --packing   # + packed batches, alternating

The step is built as ``cvmae_jax.train`` builds it (``steps.init_state``, ``make_train_step``,
``JitLauncher.compile_train_step``; masks drawn in-step from cv-like per-code probabilities).
Each timed step includes the host->device batch copy (``put``) and waits for the new state.
On an accelerator that adds the host's round trip to every step, so two more lines launch the
steps back to back and wait once: "pipelined" with the batch copies (train.py's loop, which
waits once per logging window, gets no more than this) and "device" on batches already on the
device; "host launch" is the host's own time per step.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import jax
import jax.numpy as jnp

from benchmarks import common
from cvmae_jax import parallel, steps
from cvmae_jax.attention import IMPLEMENTATIONS, check_attention
from cvmae_jax.masking import mask_root, sample_value_mask
from cvmae_jax.model import ModelConfig

NUM_BATCHES = 8  # distinct batches, cycled
ROUND_STEPS = 5  # steps per runner between switches when alternating


def optimizer_config(cfg: common.BenchConfig):
    """The train.* fields ``steps.make_optimizer`` reads (config.py defaults)."""
    import ml_collections

    return ml_collections.ConfigDict(dict(
        learning_rate=1e-3, warmup_steps=100, num_steps=2000, weight_decay=0.01,
        grad_clip_norm=1.0))


def model_config(cfg: common.BenchConfig, dtype: str = "float32",
                 attention: str = "einsum") -> ModelConfig:
    return ModelConfig(vocab_size=cfg.vocab, d_model=cfg.d_model, num_heads=cfg.heads,
                       num_layers=cfg.layers, mlp_ratio=cfg.mlp_ratio,
                       time_frequencies=cfg.time_frequencies, dtype=dtype, attention=attention)


def cost_flops(compiled) -> float:
    """FLOPs per call from XLA's cost analysis (a dict, or a list of one dict on older jax)."""
    analysis = compiled.cost_analysis()
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0]
    return float(analysis.get("flops", float("nan")))


class JaxStep:
    """The compiled train step with its state and batches; ``step(i)`` runs and waits."""

    name = "jax jit"
    packed_name = "jax jit packed"

    def __init__(self, cfg: common.BenchConfig, dtype: str = "float32", packed: bool = False,
                 attention: str = "einsum"):
        check_attention(attention, dtype, jax.default_backend())
        self.cfg = cfg
        self.launcher = parallel.JitLauncher(jax.devices())
        optimizer = steps.make_optimizer(optimizer_config(cfg))
        graphdef, state = steps.init_state(model_config(cfg, dtype, attention), optimizer,
                                           cfg.seed)
        self.state = self.launcher.put_state(state)
        self.mask_probs = jnp.asarray(common.cv_like_probs(cfg.vocab, cfg.seed))
        self.body = steps.make_train_step(
            graphdef, optimizer, self.mask_probs, mask_root(cfg.seed), cfg.unmasked_weight,
            self.launcher.axis_name)
        make_batches = common.packed_batches if packed else common.synthetic_batches
        self.batches = make_batches(cfg, NUM_BATCHES, cfg.seed)
        if packed:
            self.name = self.packed_name
        self.tokens_per_batch = common.real_tokens(self.batches)
        self.flops = common.model_flops(cfg)

    def compile(self) -> float:
        """Ahead-of-time compile; returns seconds."""
        start = time.perf_counter()
        self.compiled = self.launcher.compile_train_step(self.body, self.state, self.batches[0])
        self.state = self.compiled.flatten(self.state)  # as train.py holds it
        self.device_batches = [self.compiled.put(batch) for batch in self.batches]
        seconds = time.perf_counter() - start
        # XLA's cost analysis counts one device's share of the sharded step.
        self.xla_flops = cost_flops(self.compiled) * self.launcher.num_devices
        return seconds

    def mask_sampling_s(self, calls: int = 100) -> float:
        """Seconds per call of the step's mask draw (``sample_value_mask`` on this runner's
        batches) compiled alone, calls launched back to back: an upper bound on its share
        inside the fused step."""
        sample = jax.jit(lambda step, b: sample_value_mask(
            mask_root(self.cfg.seed), step, b["example_id"], b["codes"], b["valid"],
            self.mask_probs, b.get("positions")))
        batches = [jax.device_put(b) for b in self.batches]
        sample(0, batches[0]).block_until_ready()
        masks = []  # independent calls: wait for all of them
        return common.time_pipelined(
            lambda i: masks.append(sample(i, batches[i % NUM_BATCHES])), calls,
            wait=lambda _: jax.block_until_ready(masks))

    def launch(self, i: int, on_device: bool = False) -> tuple:
        """Launches the step on batch ``i`` without waiting, copying the batch to the device
        first as ``train.py`` does (or, ``on_device``, using the copy made at compile time);
        returns (state leaves, metrics), still being computed."""
        batch = (self.device_batches[i % NUM_BATCHES] if on_device
                 else self.compiled.put(self.batches[i % NUM_BATCHES]))
        self.state, self.metrics = self.compiled(self.state, batch)
        return self.state, self.metrics

    def launch_host_s(self, n: int) -> float:
        """Median seconds the host spends in ``launch`` (batch copy and step call), waiting for
        each step afterwards. When the pipelined step is close to this and above the device
        step (``pipelined_s(on_device=True)``), the host sets the pace."""
        times = []
        for i in range(n):
            start = time.perf_counter()
            result = self.launch(i)
            times.append(time.perf_counter() - start)
            jax.block_until_ready(result)
        return statistics.median(times)

    def wait(self, result: tuple) -> None:
        jax.block_until_ready(result)

    def step(self, i: int) -> None:
        self.wait(self.launch(i))

    def pipelined_s(self, n: int, on_device: bool = False) -> float:
        """Seconds per step over ``n`` steps launched back to back (``common.time_pipelined``):
        with the batch copies, the rate of a training loop whose host stays ahead; with the
        batches already on the device (``on_device``), the device's time per step."""
        return common.time_pipelined(lambda i: self.launch(i, on_device), n, wait=self.wait)


def add_attention_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--attention", default="einsum", choices=IMPLEMENTATIONS,
                        help="config.model.attention of the JAX model (cudnn: NVIDIA GPUs, "
                             "--dtype=bfloat16)")


def report(name: str, compile_s: float, times: list[float], tokens: float, flops: float,
           ceiling_gflops: float) -> dict:
    """Result record of one timed runner (shared with compare_torch)."""
    s = common.summary(times)
    achieved = flops / s["median_s"]
    return dict(name=name, compile_s=compile_s, **s, real_tokens_per_step=tokens,
                tokens_per_s=tokens / s["median_s"], flops_per_step=flops,
                achieved_gflops=achieved / 1e9,
                ceiling_fraction=achieved / 1e9 / ceiling_gflops)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common.add_config_args(parser)
    parser.add_argument("--dtype", default="float32", choices=common.DTYPES,
                        help="model compute dtype (parameters stay float32)")
    add_attention_arg(parser)
    parser.add_argument("--packing", action="store_true",
                        help="also time packed batches of the same examples, alternating with "
                             "the padded ones, and print the ratio of real tokens/s")
    args = parser.parse_args()
    cfg = common.config_from_args(args)
    print(common.machine_info())
    print(cfg)
    common.progress("measuring the matmul ceiling")
    ceiling = common.matmul_ceiling_gflops(args.dtype)
    runners = [JaxStep(cfg, args.dtype, attention=args.attention)] + (
        [JaxStep(cfg, args.dtype, packed=True, attention=args.attention)] if args.packing else [])
    compile_s, times = {}, {}
    for runner in runners:
        common.progress(f"{runner.name}: compiling, then {cfg.warmup} warm-up steps")
        compile_s[runner.name] = runner.compile()
        common.time_calls(runner.step, cfg.warmup)
        times[runner.name] = []
    rounds = max(1, cfg.steps // ROUND_STEPS) if len(runners) > 1 else 1
    for r in range(rounds):  # alternate runners so both see the same machine load
        common.progress(f"timing round {r + 1}/{rounds}")
        for runner in runners:
            times[runner.name] += common.time_calls(runner.step, cfg.steps // rounds)
    results = [report(runner.name, compile_s[runner.name], times[runner.name],
                      runner.tokens_per_batch, runner.flops, ceiling) for runner in runners]
    # On the CPU the device is the host's cores: a few steps show that the three agree.
    pipelined_steps = cfg.steps if jax.default_backend() != "cpu" else min(cfg.steps, 5)
    for runner, result in zip(runners, results):
        common.progress(f"{runner.name}: {pipelined_steps} steps launched back to back, twice")
        step_s = runner.pipelined_s(pipelined_steps)
        result.update(pipelined_steps=pipelined_steps, pipelined_step_s=step_s,
                      pipelined_ceiling_fraction=runner.flops / step_s / 1e9 / ceiling,
                      device_step_s=runner.pipelined_s(pipelined_steps, on_device=True),
                      launch_host_s=runner.launch_host_s(pipelined_steps),
                      mask_sampling_s=runner.mask_sampling_s())
        _print_result(runner, result, cfg, ceiling, args.dtype)
    if args.packing:
        print(f"packed/padded real tokens/s = "
              f"{results[1]['tokens_per_s'] / results[0]['tokens_per_s']:.2f}")
    common.write_json(args.json, dict(machine=common.machine_info(), config=vars(args),
                                      bench_config=dataclasses.asdict(cfg),
                                      matmul_ceiling_gflops=ceiling, times_s=times,
                                      xla_flops=[runner.xla_flops for runner in runners],
                                      results=results))


def _print_result(runner: JaxStep, result: dict, cfg: common.BenchConfig,
                  ceiling: float, dtype: str) -> None:
    print(f"--- {runner.name}")
    print(f"compile time          {result['compile_s']:.2f} s")
    print(f"step time             median {result['median_s'] * 1e3:.2f} ms  "
          f"min {result['min_s'] * 1e3:.2f}  max {result['max_s'] * 1e3:.2f}  "
          f"(n={result['n']}, each step waited for)")
    print(f"pipelined step        {result['pipelined_step_s'] * 1e3:.2f} ms  "
          f"({result['pipelined_steps']} steps launched back to back, each copying its batch as "
          f"train.py does; {result['pipelined_ceiling_fraction']:.1%} of the ceiling)")
    print(f"device step           {result['device_step_s'] * 1e3:.2f} ms  (the same on batches "
          f"already on the device)")
    print(f"host launch           {result['launch_host_s'] * 1e3:.2f} ms per step  (batch copy "
          f"and step call; near the pipelined step and above the device step, the host sets "
          f"the pace)")
    print(f"real tokens/s         {result['tokens_per_s']:,.0f} (waited-for median)  "
          f"({result['real_tokens_per_step']:.0f} of {cfg.batch * cfg.seq} tokens per step)")
    print(f"FLOPs/step            {runner.flops / 1e9:.2f} GFLOP (model count; XLA cost "
          f"analysis: {runner.xla_flops / 1e9:.2f})")
    print(f"achieved              {result['achieved_gflops']:.1f} GFLOP/s (waited-for median)")
    print(f"matmul ceiling        {ceiling:.1f} GFLOP/s (jit {dtype} dot, "
          f"best of 20, {jax.devices()[0].device_kind})")
    print(f"fraction of ceiling   {result['ceiling_fraction']:.1%} (waited-for median)")
    print(f"mask sampling         {result['mask_sampling_s'] * 1e3:.3f} ms compiled alone, "
          f"launched back to back ({result['mask_sampling_s'] / result['device_step_s']:.2%} "
          f"of the device step: an upper bound)")


if __name__ == "__main__":
    main()
