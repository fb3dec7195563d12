"""Time variants of the JAX train step against the unchanged one, alternating in one process.

    python -m benchmarks.jax_variants --config=default [--rounds=5 --steps=4 --only=bfloat16,...]

Variants change ``config.model.attention`` or the compute dtype, or (diagnostic only, not the
model) patch a piece of it: attention replaced by ``v`` to bound what attention costs, or the
code embedding gathered from its float32 table (a suspect of the slow bfloat16 step on GPUs).
XLA flags act per process: run ``step_bench`` under different ``XLA_FLAGS`` for those.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses

import jax.numpy as jnp
from flax import nnx

from benchmarks import common
from benchmarks import step_bench
from benchmarks.step_bench import JaxStep
from cvmae_jax import model


def no_attention(q, k, v, keep, implementation="einsum"):
    return v


@contextlib.contextmanager
def attention_replaced_by_v():
    """Diagnostic: attention returns v, to bound what attention costs."""
    original = model.self_attention
    model.self_attention = no_attention
    try:
        yield
    finally:
        model.self_attention = original


@contextlib.contextmanager
def embedding_gathered_in_param_dtype():
    """Diagnostic for bfloat16: ``nnx.Embed`` casts the whole table to the compute dtype before
    the gather, so its gradient is a scatter-add in bfloat16; here the gather reads the float32
    table and casts the [B, L, D] result, so the scatter-add runs in float32."""
    original = nnx.Embed.__call__

    def call(self, inputs, *args, **kwargs):
        return jnp.take(self.embedding[...], inputs, axis=0).astype(self.dtype)

    nnx.Embed.__call__ = call
    try:
        yield
    finally:
        nnx.Embed.__call__ = original


VARIANTS = {  # name -> (config.model.attention, dtype, diagnostic patch or None)
    "baseline": ("einsum", "float32", None),
    "dot_product_attention": ("dot_product_attention", "float32", None),
    "bfloat16": ("einsum", "bfloat16", None),
    "no_attention": ("einsum", "float32", attention_replaced_by_v),
    "bfloat16_dot_product_attention": ("dot_product_attention", "bfloat16", None),
    "bfloat16_no_attention": ("einsum", "bfloat16", attention_replaced_by_v),
    "bfloat16_float32_embedding_gather": ("einsum", "bfloat16", embedding_gathered_in_param_dtype),
}


@contextlib.contextmanager
def variant(attention: str, patch):
    """While tracing: the model built with ``attention``, with the diagnostic ``patch`` on."""
    original_config = step_bench.model_config
    step_bench.model_config = lambda cfg, dtype="float32": dataclasses.replace(
        original_config(cfg, dtype), attention=attention)
    try:
        with patch() if patch is not None else contextlib.nullcontext():
            yield
    finally:
        step_bench.model_config = original_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common.add_config_args(parser, steps=4, warmup=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--only", default=",".join(VARIANTS), help="comma-separated variants")
    args = parser.parse_args()
    cfg = common.config_from_args(args)
    names = ["baseline"] + [n for n in args.only.split(",") if n != "baseline"]
    runners, times, compile_s = {}, {}, {}
    for name in names:
        attention, dtype, patch = VARIANTS[name]
        common.progress(f"{name}: compiling")
        with variant(attention, patch):
            runners[name] = JaxStep(cfg, dtype)
            compile_s[name] = runners[name].compile()
        common.time_calls(runners[name].step, cfg.warmup)
        times[name] = []
    for r in range(args.rounds):
        common.progress(f"round {r + 1}/{args.rounds}")
        for name, runner in runners.items():
            times[name] += common.time_calls(runner.step, cfg.steps, start=cfg.warmup + r * cfg.steps)
    base = common.summary(times["baseline"])["median_s"]
    print(f"config: {cfg}; {args.rounds} rounds x {cfg.steps} steps; "
          f"load avg {common.machine_info().get('load_avg_1min', float('nan')):.1f}")
    print(f"{'variant':34s} {'compile s':>9s} {'GFLOP':>7s} {'median ms':>9s} {'min ms':>7s} "
          f"{'vs baseline':>11s}")
    for name, runner in runners.items():
        s = common.summary(times[name])
        print(f"{name:34s} {compile_s[name]:9.2f} {runner.flops / 1e9:7.2f} "
              f"{s['median_s'] * 1e3:9.1f} {s['min_s'] * 1e3:7.1f} {s['median_s'] / base:11.2f}")
    common.write_json(args.json, dict(config=vars(args), times_s=times, compile_s=compile_s))


if __name__ == "__main__":
    main()
