"""Time variants of the JAX train step against the unchanged one, alternating in one process.

    python -m benchmarks.jax_variants --config=default [--rounds=5 --steps=4 --only=key_mask,...]

Variants swap ``jax.nn.dot_product_attention`` (as ``cvmae_jax.model`` calls it) only while the
step is traced, or change the compute dtype; cvmae_jax itself is not modified. ``no_attention``
is a diagnostic (not the model): it bounds what attention costs. XLA flags act per process: run
``step_bench`` under different ``XLA_FLAGS`` for those.
"""

from __future__ import annotations

import argparse
import contextlib

import jax
import jax.numpy as jnp

from benchmarks import common
from benchmarks.step_bench import JaxStep

_ORIGINAL = jax.nn.dot_product_attention


def key_mask_attention(q, k, v, mask=None, **kw):
    """Same results at real queries: the [B, 1, L, L] mask reduced to a [B, 1, 1, L] key mask."""
    return _ORIGINAL(q, k, v, mask=jnp.any(mask, axis=-2, keepdims=True), **kw)


def einsum_attention(q, k, v, mask=None, **kw):
    """Hand-written attention: additive key bias [B, 1, 1, L], softmax, weighted sum."""
    bias = jnp.where(jnp.any(mask, axis=-2, keepdims=True), 0.0, -1e30).astype(q.dtype)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(q.shape[-1]).astype(q.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits + bias, axis=-1), v)


def no_attention(q, k, v, mask=None, **kw):
    return v


VARIANTS = {  # name -> (attention replacement or None, dtype)
    "baseline": (None, "float32"),
    "key_mask": (key_mask_attention, "float32"),
    "einsum_key_bias": (einsum_attention, "float32"),
    "bfloat16": (None, "bfloat16"),
    "no_attention": (no_attention, "float32"),
}


@contextlib.contextmanager
def patched_attention(fn):
    if fn is not None:
        jax.nn.dot_product_attention = fn
    try:
        yield
    finally:
        jax.nn.dot_product_attention = _ORIGINAL


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
        attention, dtype = VARIANTS[name]
        common.progress(f"{name}: compiling")
        runners[name] = JaxStep(cfg, dtype)
        with patched_attention(attention):
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
    print(f"{'variant':16s} {'compile s':>9s} {'GFLOP':>7s} {'median ms':>9s} {'min ms':>7s} "
          f"{'vs baseline':>11s}")
    for name, runner in runners.items():
        s = common.summary(times[name])
        print(f"{name:16s} {compile_s[name]:9.2f} {runner.flops / 1e9:7.2f} "
              f"{s['median_s'] * 1e3:9.1f} {s['min_s'] * 1e3:7.1f} {s['median_s'] / base:11.2f}")
    common.write_json(args.json, dict(config=vars(args), times_s=times, compile_s=compile_s))


if __name__ == "__main__":
    main()
