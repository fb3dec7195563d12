"""Time variants of the JAX train step against the unchanged one, alternating in one process.

    python -m benchmarks.jax_variants --config=default [--rounds=5 --steps=4 --only=bfloat16,...]

Variants change ``config.model.attention`` (``cudnn`` compiles on NVIDIA GPUs only; elsewhere it
is reported as skipped) or the compute dtype, or (diagnostic only, not the model) patch a piece
of it: attention replaced by ``v`` to bound what attention costs, the code embedding computed
the way ``nnx.Embed`` does (table cast to bfloat16 before the gather), which makes the bfloat16
step 3x slower on GPUs, or the value masks drawn without ``jax.random`` (``*_fixed_mask``: the
difference is what in-step mask sampling costs).
XLA flags act per process: run ``step_bench`` under different ``XLA_FLAGS`` for those.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import statistics

import jax.numpy as jnp

from benchmarks import common
from benchmarks.step_bench import JaxStep
from cvmae_jax import model, steps


@contextlib.contextmanager
def patched(owner, attribute: str, replacement):
    """While tracing: ``owner.attribute`` replaced (a diagnostic, not the model)."""
    original = getattr(owner, attribute)
    setattr(owner, attribute, replacement)
    try:
        yield
    finally:
        setattr(owner, attribute, original)


def attention_replaced_by_v():
    """Diagnostic: attention returns v, to bound what attention costs."""
    return patched(model, "self_attention", lambda q, k, v, keep, implementation="einsum": v)


def table_cast_before_gather():
    """Diagnostic for bfloat16: the code embedding as ``nnx.Embed`` computes it, casting the
    whole table to the compute dtype before the gather (its gradient is then a bfloat16
    scatter-add); the model gathers from the float32 table instead."""
    return patched(model.ValueOnlyMAE, "embed_codes", lambda self, codes: self.code_embed(codes))


def fixed_pattern_mask(root, step, example_id, codes, valid, probs, positions=None):
    """Diagnostic: ``sample_value_mask`` without the random draws. Each token's "uniform" is
    a fixed golden-ratio sequence over its position, so the mask rate per code is the same but
    no ``jax.random`` bits are generated; the step-time difference is what the draws cost."""
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(codes.shape[1]), codes.shape)
    pseudo_uniform = (positions * 0.6180339887) % 1.0
    return (pseudo_uniform < jnp.take(probs, codes)) & valid


def masks_without_random_draws():
    return patched(steps, "sample_value_mask", fixed_pattern_mask)


VARIANTS = {  # name -> (config.model.attention, dtype, diagnostic patch or None)
    "baseline": ("einsum", "float32", None),
    "dot_product_attention": ("dot_product_attention", "float32", None),
    "no_attention": ("einsum", "float32", attention_replaced_by_v),
    "bfloat16": ("einsum", "bfloat16", None),
    "bfloat16_dot_product_attention": ("dot_product_attention", "bfloat16", None),
    "bfloat16_no_attention": ("einsum", "bfloat16", attention_replaced_by_v),
    "bfloat16_table_cast_before_gather": ("einsum", "bfloat16", table_cast_before_gather),
    "bfloat16_cudnn": ("cudnn", "bfloat16", None),
    "fixed_mask": ("einsum", "float32", masks_without_random_draws),
    "bfloat16_cudnn_fixed_mask": ("cudnn", "bfloat16", masks_without_random_draws),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common.add_config_args(parser, steps=4, warmup=2,
                           steps_help="timed steps per variant and round")
    parser.add_argument("--rounds", type=common.count_arg(1), default=5,
                        help="alternating rounds")
    parser.add_argument("--only", default=",".join(VARIANTS),
                        help="comma-separated variants, of: " + ", ".join(VARIANTS))
    args = parser.parse_args()
    unknown = sorted(set(args.only.split(",")) - set(VARIANTS))
    if unknown:
        parser.error(f"--only: unknown variants {unknown}; have {', '.join(VARIANTS)}")
    cfg = common.config_from_args(args)
    names = ["baseline"] + [n for n in args.only.split(",") if n != "baseline"]
    runners, times, device, compile_s = {}, {}, {}, {}
    for name in names:
        attention, dtype, patch = VARIANTS[name]
        common.progress(f"{name}: compiling")
        try:
            with patch() if patch is not None else contextlib.nullcontext():
                runner = JaxStep(cfg, dtype, attention=attention)
                compile_s[name] = runner.compile()
        except (ValueError, RuntimeError) as error:  # cuDNN attention off an NVIDIA GPU
            if attention != "cudnn":
                raise
            print(f"{name}: skipped here: {type(error).__name__}: {error}".splitlines()[0])
            continue
        runners[name] = runner
        common.time_calls(runner.step, cfg.warmup)
        times[name], device[name] = [], []
    for r in range(args.rounds):
        common.progress(f"round {r + 1}/{args.rounds}")
        order = list(runners) if r % 2 == 0 else list(reversed(runners))
        for name in order:
            times[name] += common.time_calls(runners[name].step, cfg.steps)
            device[name].append(runners[name].pipelined_s(cfg.steps, on_device=True))
    base = common.summary(times["baseline"])["median_s"]
    device_base = statistics.median(device["baseline"])
    print(f"config: {cfg}; {args.rounds} rounds x {cfg.steps} steps; "
          f"load avg {common.machine_info().get('load_avg_1min', float('nan')):.1f}")
    width = max(len(name) for name in runners)
    print("(median/min: each step waited for, batch copy included; device: median over rounds "
          "of the steps launched back to back on batches already on the device, the column to "
          "compare on accelerators, with --steps of 20 or more)")
    print(f"{'variant':{width}s} {'compile s':>9s} {'XLA GF':>7s} {'median ms':>9s} {'min ms':>7s} "
          f"{'vs baseline':>11s} {'device ms':>9s} {'vs baseline':>11s}")
    for name, runner in runners.items():
        s = common.summary(times[name])
        device_s = statistics.median(device[name])
        print(f"{name:{width}s} {compile_s[name]:9.2f} {runner.xla_flops / 1e9:7.2f} "
              f"{s['median_s'] * 1e3:9.2f} {s['min_s'] * 1e3:7.2f} {s['median_s'] / base:11.3f} "
              f"{device_s * 1e3:9.3f} {device_s / device_base:11.3f}")
    common.write_json(args.json, dict(machine=common.machine_info(), config=vars(args),
                                      bench_config=dataclasses.asdict(cfg), times_s=times,
                                      device_step_s=device, compile_s=compile_s))


if __name__ == "__main__":
    main()
