"""The VO-MAE in PyTorch: what a user would write instead (needs the ``[bench]`` extra).

    python -m benchmarks.torch_reference --config=default [--no-compile --json=out.json]

Same architecture, loss and optimizer as ``cvmae_jax`` (pre-LN encoder, code embedding + the same
time features + value Linear(1->d) replaced by a learned mask vector where hidden, SDPA with a
key-padding mask, tanh-GELU MLP, final LayerNorm, linear head; masked MSE + 0.1 x unmasked MSE;
global-norm clipping + AdamW). Masks are drawn on the host per batch with numpy, as a PyTorch
data loader would, and copied to the device with the batch each step. Parameter names follow the
Flax module (``load_flax_params`` copies them). Timed eager and under ``torch.compile``, on the
GPU when torch sees one (float32 matmuls then use TF32, as XLA's default precision does on
recent NVIDIA GPUs), else on the CPU. ``--dtype=bfloat16`` runs under ``torch.autocast``
(parameters stay float32). Autocast's policy differs from ``config.model.dtype='bfloat16'``:
torch keeps the embedding, LayerNorm and loss in float32 and runs matmuls in bf16, while the
Flax model computes every layer (the embedding gather included) in bf16.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
import traceback

import numpy as np

from benchmarks import common

torch = common.import_torch()
F, nn = torch.nn.functional, torch.nn

LAYER_NORM_EPS = 1e-6  # flax.nnx.LayerNorm's default
NUM_BATCHES = 8


def time_features(hours: torch.Tensor, num_frequencies: int, max_period: float) -> torch.Tensor:
    """``cvmae_jax.model.time_features`` in torch: sin/cos at geometric periods, log1p(hours)."""
    periods = np.geomspace(1.0, max_period, num_frequencies).astype(np.float32)
    angles = hours[..., None] * torch.from_numpy(2.0 * np.pi / periods).to(hours.device)
    return torch.cat([torch.sin(angles), torch.cos(angles),
                      torch.log1p(hours.clamp_min(0.0))[..., None]], dim=-1)


class EncoderBlock(nn.Module):
    """Pre-LayerNorm block: x + MHA(LN(x)); x + MLP(LN(x))."""

    def __init__(self, d: int, heads: int, mlp_ratio: int):
        super().__init__()
        self.heads = heads
        self.attn_norm = nn.LayerNorm(d, eps=LAYER_NORM_EPS)
        self.qkv = nn.Linear(d, 3 * d)
        self.attn_out = nn.Linear(d, d)
        self.mlp_norm = nn.LayerNorm(d, eps=LAYER_NORM_EPS)
        self.mlp_in = nn.Linear(d, mlp_ratio * d)
        self.mlp_out = nn.Linear(mlp_ratio * d, d)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        """x [B, L, D]; key_mask bool [B, 1, 1, L] (True = attend)."""
        b, length, d = x.shape
        # Column order of qkv is (3, heads, head_dim), as the Flax reshape reads it.
        qkv = self.qkv(self.attn_norm(x)).view(b, length, 3, self.heads, d // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, H, L, hd]
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)
        x = x + self.attn_out(attended.transpose(1, 2).reshape(b, length, d))
        return x + self.mlp_out(F.gelu(self.mlp_in(self.mlp_norm(x)), approximate="tanh"))


class TorchVOMAE(nn.Module):
    """VO-MAE with the Flax module's parameter names and shapes (Linear weights transposed)."""

    def __init__(self, cfg: common.BenchConfig, max_period: float = 24.0 * 365.0):
        super().__init__()
        d = cfg.d_model
        self.time_frequencies, self.max_period = cfg.time_frequencies, max_period
        self.code_embed = nn.Embedding(cfg.vocab, d)
        self.time_proj = nn.Linear(2 * cfg.time_frequencies + 1, d)
        self.value_proj = nn.Linear(1, d)
        self.mask_embedding = nn.Parameter(0.02 * torch.randn(d))
        self.blocks = nn.ModuleList(
            [EncoderBlock(d, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.layers)])
        self.final_norm = nn.LayerNorm(d, eps=LAYER_NORM_EPS)
        self.head = nn.Linear(d, 1)

    def forward(self, times, codes, values, value_mask, valid, segment_ids=None) -> torch.Tensor:
        """Predicted normalized values [B, L]. Outputs at padded positions are not used (padded
        queries attend to the valid keys here, to a uniform mix in the Flax model). Packed rows
        pass ``segment_ids`` [B, L] (0 on padding): each token attends within its segment
        (padding among padding), a dense [B, 1, L, L] mask."""
        value_emb = self.value_proj(torch.where(value_mask, 0.0, values)[..., None])
        value_emb = torch.where(value_mask[..., None], self.mask_embedding, value_emb)
        x = (self.code_embed(codes)
             + self.time_proj(time_features(times, self.time_frequencies, self.max_period))
             + value_emb)
        key_mask = (valid[:, None, None, :] if segment_ids is None else
                    segment_ids[:, None, :, None] == segment_ids[:, None, None, :])
        for block in self.blocks:
            x = block(x, key_mask)
        return self.head(self.final_norm(x))[..., 0]


def reconstruction_loss(predictions, values, value_mask, valid, unmasked_weight: float):
    """Masked MSE + unmasked_weight x visible MSE over real tokens."""
    squared_error = (predictions - values).square()
    masked = (value_mask & valid).float()
    visible = (~value_mask & valid).float()
    return ((squared_error * masked).sum() / masked.sum().clamp_min(1.0)
            + unmasked_weight * (squared_error * visible).sum() / visible.sum().clamp_min(1.0))


def load_flax_params(module: TorchVOMAE, flax_params: dict) -> None:
    """Copy Flax parameters (``nnx.to_pure_dict(nnx.state(model, nnx.Param))``) into ``module``.

    nnx ``Linear.kernel`` [in, out] -> torch ``weight`` [out, in]; ``Embed.embedding`` ->
    ``weight``; ``LayerNorm.scale`` -> ``weight``; ``mask_embedding`` as is.
    """
    renames = {"kernel": "weight", "embedding": "weight", "scale": "weight"}

    def flatten(tree, prefix=""):
        for key, value in tree.items():
            name = f"{prefix}{key}"
            if isinstance(value, dict):
                yield from flatten(value, name + ".")
            else:
                yield name, value

    target = dict(module.named_parameters())
    copied = set()
    for name, value in flatten(flax_params):
        parts = name.split(".")
        kind = parts[-1]
        parts[-1] = renames.get(kind, kind)
        torch_name = ".".join(parts)
        array = np.array(value, dtype=np.float32)
        if kind == "kernel":
            array = array.T
        param = target[torch_name]
        if tuple(param.shape) != array.shape:
            raise ValueError(f"{name}: Flax shape {array.shape} vs torch {tuple(param.shape)}")
        with torch.no_grad():
            param.copy_(torch.from_numpy(np.ascontiguousarray(array)))
        copied.add(torch_name)
    missing = set(target) - copied
    if missing:
        raise ValueError(f"torch parameters not in the Flax params: {sorted(missing)}")


def host_mask(batch: dict, probs: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """bool [B, L]: a value is hidden with its code's probability; never on padding."""
    return (rng.random(batch["codes"].shape) < probs[batch["codes"]]) & batch["valid"]


def default_device() -> str:
    """"cuda" when torch sees a GPU, else "cpu"; on a GPU float32 matmuls use TF32 (JAX's default
    precision there), so both frameworks do the same arithmetic."""
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        return "cuda"
    return "cpu"


class TorchStep:
    """One training step (host mask, forward, loss, backward, clip, AdamW), eager or compiled,
    on padded batches or (``packed``) on the JAX benchmark's packed rows with a dense
    block-diagonal attention mask."""

    def __init__(self, cfg: common.BenchConfig, compiled: bool, dtype: str = "float32",
                 packed: bool = False):
        if dtype not in common.DTYPES:
            raise ValueError(f"dtype={dtype!r} must be one of {common.DTYPES}")
        torch.manual_seed(cfg.seed)
        self.cfg, self.compiled = cfg, compiled
        self.device = default_device()
        self.autocast = torch.autocast(self.device, dtype=torch.bfloat16,
                                       enabled=dtype == "bfloat16")
        self.name = ("torch compile" if compiled else "torch eager") + (" packed" if packed
                                                                        else "")
        self.model = TorchVOMAE(cfg).to(self.device)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-3, weight_decay=0.01)
        self.probs = common.cv_like_probs(cfg.vocab, cfg.seed)
        self.rng = np.random.default_rng(cfg.seed)
        make_batches = common.packed_batches if packed else common.synthetic_batches
        self.batches = make_batches(cfg, NUM_BATCHES, cfg.seed)
        self.tokens_per_batch = common.real_tokens(self.batches)

        def loss_fn(times, codes, values, value_mask, valid, segment_ids=None):
            predictions = self.model(times, codes, values, value_mask, valid, segment_ids)
            return reconstruction_loss(predictions, values, value_mask, valid,
                                       cfg.unmasked_weight)

        self.loss_fn = torch.compile(loss_fn) if compiled else loss_fn

    def launch(self, i: int) -> torch.Tensor:
        """Runs the step on batch ``i`` without reading the loss (on a GPU the kernels may still
        be running); returns the detached loss."""
        batch = self.batches[i % NUM_BATCHES]
        mask = host_mask(batch, self.probs, self.rng)
        fields = [batch["times"], batch["codes"], batch["values"], mask, batch["valid"]]
        if "segment_ids" in batch:
            fields.append(batch["segment_ids"])
        inputs = [self.to_device(torch.from_numpy(a)) for a in fields]
        with self.autocast:
            loss = self.loss_fn(*inputs)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        return loss.detach()

    def to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        """On a GPU, a copy from pinned memory that does not wait for the running kernels (as
        a DataLoader with ``pin_memory=True`` feeds ``.to(device, non_blocking=True)``); a
        copy from pageable memory would wait for the previous step."""
        if self.device == "cpu":
            return tensor
        return tensor.pin_memory().to(self.device, non_blocking=True)

    def wait(self, loss: torch.Tensor) -> None:
        self.loss = loss.item()  # waits for the device

    def step(self, i: int) -> None:
        self.wait(self.launch(i))

    def compile(self) -> float:
        """Run the first step (torch.compile traces and compiles there); returns seconds."""
        start = time.perf_counter()
        self.step(0)
        return time.perf_counter() - start


def torch_matmul_gflops(dtype: str = "float32", repeats: int = 20) -> float:
    """``common.best_matmul_gflops`` of torch's matmul in ``dtype`` on ``default_device()``."""
    device = default_device()

    def make_call(n):
        a = torch.randn(n, n, device=device, dtype=getattr(torch, dtype))

        def product():
            a @ a
            if device == "cuda":
                torch.cuda.synchronize()
        return product

    return common.best_matmul_gflops(make_call, device, f"torch {dtype}", repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common.add_config_args(parser)
    parser.add_argument("--no-compile", action="store_true", help="eager only")
    parser.add_argument("--dtype", default="float32", choices=common.DTYPES,
                        help="compute dtype (bfloat16: torch.autocast, float32 parameters)")
    parser.add_argument("--sdpa", default="default", choices=("default", "math"),
                        help="math: unfused attention (materialized [B, H, L, L] scores)")
    args = parser.parse_args()
    if args.sdpa == "math":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        sdpa_kernel(SDPBackend.MATH).__enter__()  # for the whole run
    cfg = common.config_from_args(args, sharded=False)
    print(common.machine_info())
    print(cfg)
    print(f"torch matmul          {torch_matmul_gflops(args.dtype):.1f} GFLOP/s "
          f"({args.dtype}, {default_device()})")
    results = {}
    for compiled in (False,) if args.no_compile else (False, True):
        runner = TorchStep(cfg, compiled, args.dtype)
        try:
            common.progress(f"{runner.name}: first step")
            first_s = runner.compile()
        except Exception:  # torch.compile needs a working C++ toolchain
            print(f"{runner.name} failed:\n{traceback.format_exc()}")
            continue
        common.time_calls(runner.step, cfg.warmup, start=1)
        common.progress(f"{runner.name}: timing {cfg.steps} steps")
        times = common.time_calls(runner.step, cfg.steps, start=1 + cfg.warmup)
        s = common.summary(times)
        results[runner.name] = dict(first_step_s=first_s, times_s=times, **s)
        print(f"{runner.name:14s} first step {first_s:.2f} s; median {s['median_s'] * 1e3:.1f} "
              f"ms  min {s['min_s'] * 1e3:.1f}  max {s['max_s'] * 1e3:.1f}; "
              f"{runner.tokens_per_batch / s['median_s']:,.0f} real tokens/s")
    common.write_json(args.json, dict(machine=common.machine_info(), config=vars(args),
                                      bench_config=dataclasses.asdict(cfg), results=results))


if __name__ == "__main__":
    main()
