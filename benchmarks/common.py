"""Shared by the benchmark scripts: configs, synthetic batches, timing, machine description.

Nothing here imports torch, so the JAX-only scripts run without the ``[bench]`` extra.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import os
import platform
import statistics
import sys
import time
from typing import Callable

import numpy as np

from cvmae_jax.host_memory import reuse_freed_memory
from cvmae_jax.jsonio import dumps_json
from cvmae_jax.parallel import set_cpu_devices

HOST_MALLOC = "glibc defaults"  # what config_from_args set up
DTYPES = ("float32", "bfloat16")  # compute dtypes the benchmarks take (parameters stay float32)

# The benchmark configs (the model fields match config.model).
CONFIGS = {
    "default": dict(d_model=128, heads=4, layers=2, seq=256, batch=32, vocab=100),
    "large": dict(d_model=256, heads=8, layers=4, seq=256, batch=64, vocab=100),
}


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """Model shape, batch shape and how long to time."""

    name: str = "default"
    d_model: int = 128
    heads: int = 4
    layers: int = 2
    seq: int = 256
    batch: int = 32
    vocab: int = 100
    steps: int = 20
    warmup: int = 3
    mlp_ratio: int = 4
    time_frequencies: int = 16
    unmasked_weight: float = 0.1
    seed: int = 0


def count_arg(low: int):
    """An argparse type: an integer >= ``low`` (a bad count is a one-line usage error)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} is below {low}")
        return value

    parse.__name__ = f"integer >= {low}"
    return parse


def add_config_args(parser: argparse.ArgumentParser, steps: int | None = 20, warmup: int = 3,
                    steps_help: str = "timed steps") -> None:
    """--config NAME plus per-field overrides (--d_model --layers --heads --seq --batch ...),
    and --steps/--warmup unless ``steps`` is None (scripts that time their own way)."""
    parser.add_argument("--config", default="default", choices=sorted(CONFIGS))
    for field in ("d_model", "layers", "heads", "seq", "batch", "vocab"):
        parser.add_argument(f"--{field}", type=count_arg(1), default=None,
                            help="overrides --config")
    if steps is not None:
        parser.add_argument("--steps", type=count_arg(1), default=steps, help=steps_help)
        parser.add_argument("--warmup", type=count_arg(0), default=warmup,
                            help="untimed steps first")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write results here")
    parser.add_argument("--cpu_devices", type=count_arg(1), default=None, metavar="N",
                        help="on a CPU host, split it into N JAX devices and shard the batch "
                             "over them (config.parallel.cpu_devices; default: JAX's 1)")
    parser.add_argument("--system_malloc", action="store_true",
                        help="keep glibc malloc's defaults instead of reusing freed memory "
                             "(cvmae_jax/host_memory.py; train.py reuses it)")


def config_from_args(args: argparse.Namespace, sharded: bool = True) -> BenchConfig:
    """The benchmark config; also sets up host memory as ``train.py`` does (unless
    --system_malloc), before JAX or torch start their threads. ``sharded``: the script shards
    the batch over every JAX device (checked to divide it)."""
    global HOST_MALLOC
    if not args.system_malloc and reuse_freed_memory():
        HOST_MALLOC = "reuse freed memory (cvmae_jax.host_memory)"
    set_cpu_devices(args.cpu_devices)
    fields = dict(CONFIGS[args.config])
    fields.update({k: v for k, v in vars(args).items() if k in fields and v is not None})
    cfg = BenchConfig(name=args.config, steps=getattr(args, "steps", BenchConfig.steps),
                      warmup=getattr(args, "warmup", BenchConfig.warmup), **fields)
    _check_before_work(cfg, args, sharded)
    return cfg


def usage_error(message: str) -> None:
    """Exits as argparse does for a bad argument: one line, status 2."""
    print(f"{os.path.basename(sys.argv[0])}: error: {message}", file=sys.stderr)
    sys.exit(2)


def _check_before_work(cfg: BenchConfig, args: argparse.Namespace, sharded: bool) -> None:
    """What would fail only after the ceiling or a compile: the shape and the attention."""
    import jax

    if cfg.d_model % cfg.heads:
        usage_error(f"d_model={cfg.d_model} is not divisible by heads={cfg.heads}")
    if sharded and cfg.batch % jax.device_count():
        usage_error(f"batch={cfg.batch} is not divisible by the {jax.device_count()} JAX "
                    "devices (--cpu_devices)")
    check_attention_here(getattr(args, "attention", "einsum"), getattr(args, "dtype", "float32"))


def check_attention_here(attention: str, dtype: str) -> None:
    """A usage error when ``attention`` cannot run in ``dtype`` on this JAX backend."""
    import jax

    from cvmae_jax.attention import check_attention

    try:
        check_attention(attention, dtype, jax.default_backend())
    except ValueError as error:
        usage_error(str(error))


def model_flops(cfg: BenchConfig) -> float:
    """FLOPs of one train step counted from the architecture (matmuls only, padding included,
    backward ~ 2x forward): 3 B L [layers (2 d^2 (4 + 2 mlp_ratio) + 4 L d) + 2 d (2F + 1) + 4 d].
    Used for FLOP/s everywhere: XLA's cost analysis misses what runs as library calls (cuBLAS
    GEMMs after GPU autotuning, cuDNN attention); on the CPU it is within 3% of this count."""
    d = cfg.d_model
    per_token = (cfg.layers * (2 * d * d * (4 + 2 * cfg.mlp_ratio) + 4 * cfg.seq * d)
                 + 2 * d * (2 * cfg.time_frequencies + 1) + 4 * d)
    return 3.0 * cfg.batch * cfg.seq * per_token


def cv_like_probs(vocab: int, seed: int = 0) -> np.ndarray:
    """Per-code mask probabilities [V] from the project's two-tier CV rule on log-normal CVs
    (p = 0.8 above the 75th CV percentile, else 0.2), as ``masking.strategy='cv'`` gives."""
    from cvmae_jax.mask_probabilities import two_tier_probs

    cv = np.random.default_rng(seed).lognormal(np.log(0.3), 1.0, vocab)
    return two_tier_probs(cv, 75.0, 0.8, 0.2).astype(np.float32)


def synthetic_batches(cfg: BenchConfig, count: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """``count`` batches shaped like the training pipeline's: times/codes/values/valid [B, L],
    example_id [B]. Lengths are long-tailed (log-normal, median 120 events, ~20% full windows, as
    MIMIC lab windows cut at 256), codes Zipf-distributed, times hours with exponential gaps."""
    rng = np.random.default_rng(seed)
    b, length = cfg.batch, cfg.seq
    code_p = 1.0 / np.arange(1, cfg.vocab + 1) ** 1.1
    code_p /= code_p.sum()
    batches = []
    for i in range(count):
        lengths = np.clip(rng.lognormal(np.log(120.0), 1.0, b).astype(int), 2, length)
        valid = np.arange(length)[None, :] < lengths[:, None]
        times = np.cumsum(rng.exponential(4.0, (b, length)), axis=1) - 4.0
        times = np.maximum(times, 0.0)
        batches.append(dict(
            times=np.where(valid, times, 0.0).astype(np.float32),
            codes=np.where(valid, rng.choice(cfg.vocab, (b, length), p=code_p), 0).astype(np.int32),
            values=np.where(valid, rng.standard_normal((b, length)), 0.0).astype(np.float32),
            valid=valid,
            example_id=np.arange(i * b, (i + 1) * b, dtype=np.int32)))
    return batches


def packed_batches(cfg: BenchConfig, count: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """``count`` packed batches [B, L] (``cvmae_jax.data.packing``'s chunked first-fit-decreasing
    packer, with per-token example_id, segment_ids and positions) of examples drawn as
    ``synthetic_batches`` draws its rows (the same long-tailed lengths, codes and values)."""
    from cvmae_jax.data.packing import PACK_CHUNK_BATCHES, ChunkPacker
    from cvmae_jax.data.row_stream import RowStream

    def examples():
        for batch_index in itertools.count():
            padded = synthetic_batches(cfg, 1, seed + batch_index)[0]
            for i in range(cfg.batch):
                n = int(padded["valid"][i].sum())
                yield dict(times=padded["times"][i, :n], codes=padded["codes"][i, :n],
                           values=padded["values"][i, :n],
                           example_id=int(batch_index * cfg.batch + i))

    per_chunk = PACK_CHUNK_BATCHES * cfg.batch
    chunks = -(-4 * count // PACK_CHUNK_BATCHES)  # enough while rows hold <= 4 examples on average
    pool = list(itertools.islice(examples(), chunks * per_chunk))
    lengths = np.array([len(example["codes"]) for example in pool])
    packer = ChunkPacker(pool, range(len(pool)), lengths, per_chunk, cfg.seq, seed, cfg.batch)
    packed = RowStream(packer, global_rows=cfg.batch, first_row=0, num_rows=cfg.batch)
    return list(itertools.islice(iter(packed), count))


def real_tokens(batches: list[dict[str, np.ndarray]]) -> float:
    """Mean number of non-pad tokens per batch."""
    return float(np.mean([b["valid"].sum() for b in batches]))


def time_calls(fn: Callable[[int], None], n: int, start: int = 0) -> list[float]:
    """Seconds per call of ``fn(i)`` (which must block until its work is done)."""
    times = []
    for i in range(start, start + n):
        t0 = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - t0)
    return times


def time_pipelined(launch: Callable[[int], object], n: int, start: int = 0,
                   wait: Callable[[object], object] = lambda result: result) -> float:
    """Mean seconds per call of ``launch(i)`` over ``n`` calls made back to back, waiting once,
    on the last call's result (``wait(result)``, e.g. ``jax.block_until_ready``), at the end.

    On an accelerator the host launches the next call while the device runs the previous one,
    so this is the larger of the host's and the device's time per call; ``time_calls`` adds a
    host round trip to every call (on an H200 it measured a 2.3 ms step at 4.3 ms,
    benchmarks/NOTES.md)."""
    t0 = time.perf_counter()
    result = None
    for i in range(start, start + n):
        result = launch(i)
    wait(result)
    return (time.perf_counter() - t0) / n


def summary(times: list[float]) -> dict:
    return dict(median_s=statistics.median(times), min_s=min(times), max_s=max(times),
                n=len(times))


CEILING_CALL_BUDGET_S = 0.5  # the longest one ceiling matmul may take on a CPU
CEILING_SIZES: dict[str, int] = {}  # label -> n of each ceiling measured (in machine_info)


def best_matmul_gflops(make_call: Callable[[int], Callable[[], None]], device: str, label: str,
                       repeats: int = 20) -> float:
    """GFLOP/s of the best of ``repeats`` [n, n] @ [n, n] products, ``make_call(n)`` returning a
    blocking call (a ceiling; on a shared machine the median mostly measures the other load).
    n is 8192 on an accelerator (smaller sizes time the launch) and 2048 on a CPU, or smaller
    there when one product would take over CEILING_CALL_BUDGET_S (bfloat16 without native CPU
    support runs at ~0.3 GFLOP/s: 2048 would take a minute per call)."""
    n = 2048 if device == "cpu" else 8192
    if device == "cpu":
        probe = make_call(256)
        probe()
        seconds = min(time_calls(lambda _: probe(), 3))
        if seconds * (n / 256) ** 3 > CEILING_CALL_BUDGET_S:
            n = max(256, int(256 * (CEILING_CALL_BUDGET_S / seconds) ** (1 / 3)) // 64 * 64)
    progress(f"matmul ceiling: {label}, {n} x {n}, best of {repeats}")
    CEILING_SIZES[label] = n
    call = make_call(n)
    call()
    return 2.0 * n**3 / min(time_calls(lambda _: call(), repeats)) / 1e9


def matmul_ceiling_gflops(dtype: str = "float32", repeats: int = 20) -> float:
    """``best_matmul_gflops`` of a jitted dot in ``dtype`` on the default JAX device (default
    precision: TF32 for float32 on recent NVIDIA GPUs, as in the model's step)."""
    import jax
    import jax.numpy as jnp

    def make_call(n):
        a = jax.random.normal(jax.random.key(0), (n, n), jnp.dtype(dtype))
        dot = jax.jit(jnp.dot)
        return lambda: dot(a, a).block_until_ready()

    return best_matmul_gflops(make_call, jax.default_backend(), f"jax {dtype}", repeats)


def import_torch():
    """torch, or a one-line exit naming the extra that installs it."""
    try:
        import torch
    except ImportError as error:
        usage_error(f"{error}: the PyTorch reference needs the [bench] extra "
                    "(pip install -e '.[bench]')")
    return torch


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict:
    """CPU, cores, Python and library versions (torch only if already imported)."""
    import jax

    info = dict(cpu=cpu_model(), cores=os.cpu_count(), python=platform.python_version(),
                jax=jax.__version__, jax_backend=jax.default_backend(),
                jax_device=jax.devices()[0].device_kind, jax_devices=jax.device_count(),
                xla_flags=os.environ.get("XLA_FLAGS", ""), host_malloc=HOST_MALLOC,
                ceiling_matmul_sizes=dict(CEILING_SIZES))
    if "torch" in sys.modules:
        torch = sys.modules["torch"]
        info.update(torch=torch.__version__, torch_threads=torch.get_num_threads())
        if torch.cuda.is_available():
            info["torch_device"] = torch.cuda.get_device_name()
    try:
        info["load_avg_1min"] = os.getloadavg()[0]
    except OSError:
        pass
    return info


def progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def write_json(path: str | None, record: dict) -> None:
    if path:
        with open(path, "w") as f:
            f.write(dumps_json(record, indent=2, default=str))
        progress(f"wrote {path}")
