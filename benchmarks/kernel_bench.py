"""The train step's matmuls one at a time: XLA (jax.jit) vs PyTorch on the same arrays.

    python -m benchmarks.kernel_bench --config=default [--rounds=5 --calls=5]

For every matmul shape the step runs (a dense layer's forward, input gradient and weight
gradient at the largest width, and attention's scores, weighted sum and weighted-sum gradient),
a jitted ``jnp.einsum`` and ``torch.einsum`` of the same spec alternate on the same float32
arrays, ``--calls`` calls per round each. Prints median ms and GFLOP/s of both and their ratio:
where the ratio is well above 1, the JAX step cannot beat torch on that op whatever the program
around it does. Needs the ``[bench]`` extra.
"""

from __future__ import annotations

import argparse
import dataclasses

import numpy as np

from benchmarks import common


@dataclasses.dataclass(frozen=True)
class MatmulOp:
    """One matmul of the step: an einsum spec and its operand shapes."""

    name: str
    spec: str
    lhs: tuple[int, ...]
    rhs: tuple[int, ...]

    def flops(self) -> float:
        """2 x the product of all distinct dimension sizes (batch, free and contracted)."""
        sizes = dict(zip(self.spec.split("->")[0].replace(",", ""), self.lhs + self.rhs))
        return 2.0 * float(np.prod(list(sizes.values())))


def step_matmuls(cfg: common.BenchConfig) -> list[MatmulOp]:
    """The distinct matmul shapes of one train step of ``cfg`` (padding included)."""
    tokens, d, wide = cfg.batch * cfg.seq, cfg.d_model, cfg.mlp_ratio * cfg.d_model
    b, h, length, dh = cfg.batch, cfg.heads, cfg.seq, cfg.d_model // cfg.heads
    per_head = (b, h, length, dh)
    scores = (b, h, length, length)
    return [
        MatmulOp("dense forward X W", "md,df->mf", (tokens, d), (d, wide)),
        MatmulOp("dense input grad dY W^T", "mf,df->md", (tokens, wide), (d, wide)),
        MatmulOp("dense weight grad X^T dY", "md,mf->df", (tokens, d), (tokens, wide)),
        MatmulOp("attention scores Q K^T", "bhqd,bhkd->bhqk", per_head, per_head),
        MatmulOp("attention weighted sum P V", "bhqk,bhkd->bhqd", scores, per_head),
        MatmulOp("attention grad P^T dO", "bhqk,bhqd->bhkd", scores, per_head),
    ]


def time_op(op: MatmulOp, rounds: int, calls: int) -> dict[str, list[float]]:
    """Seconds per call of the op in JAX and torch, alternating ``rounds`` times."""
    import jax
    import jax.numpy as jnp

    torch = common.import_torch()
    rng = np.random.default_rng(0)
    lhs, rhs = (rng.standard_normal(shape, np.float32) for shape in (op.lhs, op.rhs))
    jax_fn = jax.jit(lambda x, y: jnp.einsum(op.spec, x, y))
    jax_args = (jax.device_put(lhs), jax.device_put(rhs))
    torch_args = (torch.from_numpy(lhs), torch.from_numpy(rhs))
    runners = {"jax": lambda _: jax_fn(*jax_args).block_until_ready(),
               "torch": lambda _: torch.einsum(op.spec, *torch_args)}
    times = {name: [] for name in runners}
    for run in runners.values():
        common.time_calls(run, 2)  # compile / warm up
    for _ in range(rounds):
        for name, run in runners.items():
            times[name] += common.time_calls(run, calls)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common.add_config_args(parser, steps=None)
    parser.add_argument("--rounds", type=common.count_arg(1), default=5,
                        help="alternating rounds")
    parser.add_argument("--calls", type=common.count_arg(1), default=5,
                        help="timed calls per round and side")
    args = parser.parse_args()
    cfg = common.config_from_args(args, sharded=False)  # host memory before torch's threads
    torch = common.import_torch()

    machine = common.machine_info()
    print(f"machine: {machine['cpu']}, {machine['cores']} cores, jax {machine['jax']} on "
          f"{machine['jax_device']} ({machine['jax_devices']} device), torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), load avg "
          f"{machine.get('load_avg_1min', float('nan')):.1f}")
    print(f"config: {cfg.name} d_model={cfg.d_model} heads={cfg.heads} seq={cfg.seq} "
          f"batch={cfg.batch}; {args.rounds} rounds x {args.calls} calls per side, float32")
    print(f"{'op':28s} {'einsum':18s} {'jax ms':>7s} {'torch ms':>8s} {'jax GF/s':>8s} "
          f"{'torch GF/s':>10s} {'jax/torch':>9s}")
    results = []
    for op in step_matmuls(cfg):
        common.progress(op.name)
        times = time_op(op, args.rounds, args.calls)
        jax_s, torch_s = (common.summary(times[side])["median_s"] for side in ("jax", "torch"))
        results.append(dict(op=op.name, spec=op.spec, lhs=op.lhs, rhs=op.rhs, flops=op.flops(),
                            jax_median_s=jax_s, torch_median_s=torch_s, times_s=times))
        print(f"{op.name:28s} {op.spec:18s} {jax_s * 1e3:7.2f} {torch_s * 1e3:8.2f} "
              f"{op.flops() / jax_s / 1e9:8.1f} {op.flops() / torch_s / 1e9:10.1f} "
              f"{jax_s / torch_s:9.2f}")
    common.write_json(args.json, dict(machine=machine, config=vars(args),
                                      bench_config=dataclasses.asdict(cfg), results=results))


if __name__ == "__main__":
    main()
