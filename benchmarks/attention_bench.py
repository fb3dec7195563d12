"""One attention layer of the step, forward and backward, on padded rows vs packed rows.

    python -m benchmarks.attention_bench --config=default [--rounds=8 --calls=3 --attention=einsum]

``cvmae_jax.attention.self_attention`` on q, k, v [B, H, L, Dh] of the config's shape, with the
mask of the benchmark's padded batch (``common.synthetic_batches``) and of its packed batch
(``common.packed_batches``), alternating ``--rounds`` times, ``--calls`` calls per round each.
The masks are arguments of the jitted function, as in the train step: as constants XLA would
fold them and time a different program. Prints median ms per
call and the ratio packed/padded.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from benchmarks.step_bench import add_attention_arg
from cvmae_jax.attention import AttentionMask, self_attention


def layer_forward_backward(implementation: str):
    """jit of (q, k, v, valid, segment_ids) -> (loss, (dq, dk, dv)) for one attention layer,
    the loss read only at real queries (as the model's loss is)."""
    def loss(q, k, v, valid, segment_ids):
        out = self_attention(q, k, v, AttentionMask(valid, segment_ids), implementation)
        return jnp.sum(jnp.square(out.astype(jnp.float32)) * valid[:, None, :, None])
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common.add_config_args(parser, steps=None)
    parser.add_argument("--rounds", type=common.count_arg(1), default=8,
                        help="alternating rounds")
    parser.add_argument("--calls", type=common.count_arg(1), default=3,
                        help="calls per round and layout")
    parser.add_argument("--dtype", default="float32", choices=common.DTYPES)
    add_attention_arg(parser)
    args = parser.parse_args()
    cfg = common.config_from_args(args, sharded=False)
    shape = (cfg.batch, cfg.heads, cfg.seq, cfg.d_model // cfg.heads)
    rng = np.random.default_rng(cfg.seed)
    q, k, v = (jnp.asarray(rng.standard_normal(shape), args.dtype) for _ in range(3))
    padded = common.synthetic_batches(cfg, 1, cfg.seed)[0]
    packed = common.packed_batches(cfg, 1, cfg.seed)[0]
    masks = {"padded": (jnp.asarray(padded["valid"]), None),
             "packed": (jnp.asarray(packed["valid"]), jnp.asarray(packed["segment_ids"]))}
    step = layer_forward_backward(args.attention)
    for valid, segment_ids in masks.values():  # compile both
        jax.block_until_ready(step(q, k, v, valid, segment_ids))
    times = {name: [] for name in masks}
    for r in range(args.rounds):
        common.progress(f"round {r + 1}/{args.rounds}")
        for name in (list(masks) if r % 2 == 0 else list(masks)[::-1]):
            times[name].append(statistics.median(common.time_calls(
                lambda _: jax.block_until_ready(step(q, k, v, *masks[name])), args.calls)))
    print(f"machine: {common.machine_info()['cpu']}, jax {jax.__version__} on "
          f"{jax.devices()[0].device_kind}")
    print(f"attention {args.attention} {args.dtype}, B={shape[0]} H={shape[1]} L={shape[2]} "
          f"Dh={shape[3]}, forward + backward; {args.rounds} rounds x {args.calls} calls")
    print(f"packed rows hold up to {int(packed['segment_ids'].max())} examples; real tokens "
          f"{int(padded['valid'].sum())} padded, {int(packed['valid'].sum())} packed")
    for name, values in times.items():
        print(f"{name:6s} {statistics.median(values) * 1e3:8.2f} ms per call (median of rounds)")
    ratio = statistics.median(times["packed"]) / statistics.median(times["padded"])
    common.write_json(args.json, dict(machine=common.machine_info(), config=vars(args),
                                      bench_config=dataclasses.asdict(cfg), times_s=times,
                                      ratio=ratio))
    print(f"ratio packed/padded = {ratio:.3f}")


if __name__ == "__main__":
    main()
