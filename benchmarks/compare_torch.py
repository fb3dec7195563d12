"""JAX train step vs the PyTorch reference (eager and torch.compile), side by side.

    python -m benchmarks.compare_torch --config=default [--rounds=5 --steps=5 --dtype=bfloat16]
    python -m benchmarks.compare_torch --config=default --packing   # + both on packed rows

Runs on the GPU when JAX and torch see one (both default to it), else on the CPU.

Each runner is compiled and warmed up, then the runners alternate: in every round each one runs
``--steps`` timed steps (A B C A B C ...), so load from other processes hits them alike. Steps
are timed ``--timing=waited`` (each step waited for; medians over all timed steps) or
``pipelined`` (each round's steps launched back to back with one wait at the end, as a training
loop runs them; medians over the rounds' means per step). The default is pipelined on an
accelerator, where a wait per step adds each framework's host round trip, and waited on the
CPU, where the two agree. The last line is ``ratio jax/torch_best = <x>`` (JAX median step time
over the best torch median, the same padded batches on both sides; < 1 means JAX is faster).

``--packing`` adds every runner again on packed rows of examples drawn the same way
(``cvmae_jax``'s packer, the same batch shape; torch with a dense block-diagonal attention
mask) and prints the time per real (non-pad) token of JAX packed against the torch runner with
the most real tokens/s, padded or packed: the time each takes to train on the same data.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import traceback

import jax

from benchmarks import common
from benchmarks.step_bench import JaxStep, add_attention_arg, report
from benchmarks.torch_reference import TorchStep, torch_matmul_gflops

TIMINGS = ("waited", "pipelined")
TIMING_NOTES = dict(waited="each step waited for",
                    pipelined="each round's steps back to back, medians over rounds")


def main() -> None:
    args = _parse_args()
    # Both frameworks share one GPU: JAX (whose backend starts at its first use, below) allocates
    # as it goes instead of reserving 75% of the memory up front.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    cfg = common.config_from_args(args)
    timing = args.timing or ("waited" if jax.default_backend() == "cpu" else "pipelined")
    ceiling = common.matmul_ceiling_gflops(args.dtype)
    torch_ceiling = torch_matmul_gflops(args.dtype)
    runners, compile_s, failed = _compiled_runners(cfg, args)
    if not runners:
        raise SystemExit("error: no runner compiled: " + "; ".join(
            f"{name}: {error}" for name, error in failed.items()))
    flops = runners[0].flops  # counted from the architecture, the same for every runner
    times = _time_rounds(runners, timing, cfg, args.rounds)
    results = [report(r.name, compile_s[r.name], times[r.name], r.tokens_per_batch, flops,
                      torch_ceiling if r.name.startswith("torch") else ceiling)
               for r in runners]  # each runner against its own framework's ceiling
    machine = common.machine_info()
    print(f"machine: {machine['cpu']}, {machine['cores']} cores, jax {machine['jax']} on "
          f"{machine['jax_device']}, torch {machine.get('torch')} on "
          f"{machine.get('torch_device', 'cpu')} ({machine.get('torch_threads')} "
          f"threads), load avg {machine.get('load_avg_1min', float('nan')):.1f}")
    print(f"config: {cfg.name} d_model={cfg.d_model} heads={cfg.heads} layers={cfg.layers} "
          f"seq={cfg.seq} batch={cfg.batch} vocab={cfg.vocab} {args.dtype}, jax attention "
          f"{args.attention} on {jax.device_count()} device(s); {args.rounds} rounds x "
          f"{cfg.steps} steps per runner, "
          f"{TIMING_NOTES[timing]}; {flops / 1e9:.2f} GFLOP/step (model count)")
    print(f"matmul ceiling ({args.dtype}): jax {ceiling:.1f} GFLOP/s, "
          f"torch {torch_ceiling:.1f} GFLOP/s (the 'ceiling' column: each runner's share of its "
          f"own framework's; torch eager's 'compile s' is its first step)")
    for name, error in failed.items():
        print(f"{name} FAILED: {error}")
    jax_median = next((r["median_s"] for r in results if r["name"] == JaxStep.name),
                      float("nan"))
    _print_table(results, jax_median)
    ratio, torch_best = _jax_vs_torch_best(results, jax_median)
    per_token = _packed_per_token(results, cfg)
    common.write_json(args.json, dict(
        machine=machine, config=dict(vars(args), timing=timing),
        bench_config=dataclasses.asdict(cfg), jax_devices=jax.device_count(),
        matmul_ceiling_gflops=dict(jax=ceiling, torch=torch_ceiling),
        ratio_jax_torch_best=ratio if torch_best else None,
        torch_best=torch_best["name"] if torch_best else None,
        time_per_real_token_jax_packed_vs_fastest_torch=per_token,
        results=results, times_s=times, failed=failed))
    print(f"ratio jax/torch_best = {ratio:.3f}" + ("" if torch_best else " (no torch runner)"))


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common.add_config_args(parser, steps=5, warmup=3,
                           steps_help="timed steps per runner and round")
    parser.add_argument("--rounds", type=common.count_arg(1), default=5,
                        help="alternating rounds")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    parser.add_argument("--dtype", default="float32", choices=common.DTYPES,
                        help="compute dtype of both (parameters stay float32)")
    parser.add_argument("--timing", default=None, choices=TIMINGS,
                        help="waited: each step waited for; pipelined: each round's steps "
                             "back to back (default: pipelined on an accelerator, else waited)")
    parser.add_argument("--packing", action="store_true",
                        help="also time every runner on packed rows and print JAX packed's time "
                             "per real token against the fastest torch runner")
    add_attention_arg(parser)
    return parser.parse_args()


def _compiled_runners(cfg, args) -> tuple[list, dict[str, float], dict[str, str]]:
    """The JAX runner, torch eager and torch.compile (each also on packed rows with
    ``--packing``), compiled and warmed up: those that compiled, their compile seconds, and the
    last line of each failure by name."""
    layouts = (False, True) if args.packing else (False,)
    runners = [JaxStep(cfg, args.dtype, packed=packed, attention=args.attention)
               for packed in layouts]
    for compiled in (False,) if args.no_compile else (False, True):
        runners += [TorchStep(cfg, compiled=compiled, dtype=args.dtype, packed=packed)
                    for packed in layouts]
    compile_s, failed = {}, {}
    for runner in list(runners):
        common.progress(f"{runner.name}: compiling / first step")
        try:
            compile_s[runner.name] = runner.compile()
        except Exception:  # torch.compile needs a working C++ toolchain
            failed[runner.name] = traceback.format_exc().strip().splitlines()[-1]
            runners.remove(runner)
            continue
        common.time_calls(runner.step, cfg.warmup, start=1)
    return runners, compile_s, failed


def _time_rounds(runners: list, timing: str, cfg, rounds: int) -> dict[str, list[float]]:
    """Seconds per step by runner name over ``rounds`` alternating rounds (``time_round``)."""
    times = {runner.name: [] for runner in runners}
    next_index = 1 + cfg.warmup
    for r in range(rounds):
        common.progress(f"round {r + 1}/{rounds}")
        for runner in runners:
            times[runner.name] += time_round(runner, timing, cfg.steps, next_index)
        next_index += cfg.steps
    return times


def _print_table(results: list[dict], jax_median: float) -> None:
    print(f"{'runner':20s} {'compile s':>9s} {'median ms':>9s} {'min ms':>7s} {'max ms':>7s} "
          f"{'tokens/s':>9s} {'GFLOP/s':>7s} {'ceiling':>7s} {'vs jax':>6s}")
    for res in results:
        print(f"{res['name']:20s} {res['compile_s']:9.2f} {res['median_s'] * 1e3:9.1f} "
              f"{res['min_s'] * 1e3:7.1f} {res['max_s'] * 1e3:7.1f} {res['tokens_per_s']:9,.0f} "
              f"{res['achieved_gflops']:7.1f} {res['ceiling_fraction']:7.1%} "
              f"{res['median_s'] / jax_median:6.2f}")


def _jax_vs_torch_best(results: list[dict], jax_median: float) -> tuple[float, dict | None]:
    """``jax_median`` over the fastest padded torch runner's median step time, and that runner
    (NaN and None without one)."""
    torch_padded = [r for r in results
                    if r["name"].startswith("torch") and not r["name"].endswith("packed")]
    torch_best = min(torch_padded, key=lambda r: r["median_s"], default=None)
    return (jax_median / torch_best["median_s"] if torch_best else float("nan")), torch_best


def _packed_per_token(results: list[dict], cfg) -> dict | None:
    """With ``--packing``: the fastest torch runner's real tokens/s over JAX packed's (printed),
    as {ratio, against}; None without both."""
    packed = next((r for r in results if r["name"] == JaxStep.packed_name), None)
    torch_results = [r for r in results if r["name"].startswith("torch")]
    if packed is None or not torch_results:
        return None
    fastest = max(torch_results, key=lambda r: r["tokens_per_s"])  # any layout
    print(f"time per real token, jax packed/{fastest['name']} = "
          f"{fastest['tokens_per_s'] / packed['tokens_per_s']:.3f} "
          f"(real tokens per step: {packed['real_tokens_per_step']:.0f} jax packed, "
          f"{fastest['real_tokens_per_step']:.0f} {fastest['name']}, of {cfg.batch * cfg.seq})")
    return dict(ratio=fastest["tokens_per_s"] / packed["tokens_per_s"], against=fastest["name"])


def time_round(runner, timing: str, steps: int, start: int) -> list[float]:
    """One round of ``runner``: seconds per step, ``steps`` values (each step waited for) or
    one (the mean of ``steps`` launched back to back, ``common.time_pipelined``)."""
    if timing == "waited":
        return common.time_calls(runner.step, steps, start=start)
    return [common.time_pipelined(runner.launch, steps, start=start, wait=runner.wait)]


if __name__ == "__main__":
    main()
