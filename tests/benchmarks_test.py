"""The PyTorch reference in benchmarks/ computes what the Flax VO-MAE computes."""

import json
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # the benchmarks package

from flax import nnx  # noqa: E402

from benchmarks import common, step_bench, torch_reference  # noqa: E402
from cvmae_jax.model import ValueOnlyMAE  # noqa: E402


def test_torch_forward_matches_flax_with_copied_weights():
    cfg = common.BenchConfig(d_model=32, heads=4, layers=2, seq=24, batch=4, vocab=11)
    flax_model = ValueOnlyMAE(step_bench.model_config(cfg), rngs=nnx.Rngs(params=3))
    torch_model = torch_reference.TorchVOMAE(cfg)
    torch_reference.load_flax_params(torch_model, nnx.to_pure_dict(nnx.state(flax_model, nnx.Param)))

    batch = common.synthetic_batches(cfg, 1, seed=1)[0]
    batch["times"] *= 50.0  # reach the longer time periods too
    batch["valid"] = np.arange(cfg.seq)[None] < np.array([[cfg.seq], [17], [5], [2]])
    for name in ("times", "codes", "values"):
        batch[name] = np.where(batch["valid"], batch[name], 0).astype(batch[name].dtype)
    mask = torch_reference.host_mask(batch, np.full(cfg.vocab, 0.4, np.float32),
                                     np.random.default_rng(0))
    valid = batch["valid"]
    assert 0 < valid.sum() < valid.size and 0 < mask.sum() < valid.sum()  # padding and masking

    args = (batch["times"], batch["codes"], batch["values"], mask, valid)
    expected = np.asarray(flax_model(*args))
    with torch.no_grad():
        got = torch_model(*[torch.from_numpy(a) for a in args]).numpy()
    np.testing.assert_allclose(got[valid], expected[valid], atol=1e-4, rtol=1e-4)
    # Hidden values do not leak in either model.
    hidden_changed = dict(zip(("times", "codes", "values"), args[:3]))
    hidden_changed["values"] = np.where(mask, 99.0, batch["values"]).astype(np.float32)
    with torch.no_grad():
        changed = torch_model(*[torch.from_numpy(a) for a in
                                (*hidden_changed.values(), mask, valid)]).numpy()
    np.testing.assert_allclose(changed[valid], got[valid], atol=1e-6)


def test_torch_packed_forward_matches_flax_with_copied_weights():
    """Packed rows (segment ids, 0 on padding): the torch reference's block-diagonal mask and
    the Flax model's give the same predictions at real tokens."""
    cfg = common.BenchConfig(d_model=32, heads=4, layers=2, seq=24, batch=4, vocab=11)
    flax_model = ValueOnlyMAE(step_bench.model_config(cfg), rngs=nnx.Rngs(params=3))
    torch_model = torch_reference.TorchVOMAE(cfg)
    torch_reference.load_flax_params(torch_model, nnx.to_pure_dict(nnx.state(flax_model, nnx.Param)))
    batch = common.synthetic_batches(cfg, 1, seed=2)[0]
    segment_ids = np.zeros((cfg.batch, cfg.seq), np.int32)
    segment_ids[0, :10], segment_ids[0, 10:24] = 1, 2  # two examples filling row 0
    segment_ids[1, :5], segment_ids[1, 5:8], segment_ids[1, 8:20] = 1, 2, 3
    segment_ids[2, :3] = 1  # and padding
    valid = segment_ids > 0
    mask = (np.random.default_rng(0).random(valid.shape) < 0.4) & valid
    args = (batch["times"], batch["codes"], batch["values"], mask, valid, segment_ids)
    expected = np.asarray(flax_model(*args))
    with torch.no_grad():
        got = torch_model(*[torch.from_numpy(a) for a in args]).numpy()
    np.testing.assert_allclose(got[valid], expected[valid], atol=1e-4, rtol=1e-4)


def test_torch_loss_matches_flax_loss():
    from cvmae_jax.model import reconstruction_loss

    rng = np.random.default_rng(0)
    predictions, values = rng.standard_normal((2, 3, 10)).astype(np.float32)
    valid = np.arange(10)[None] < np.array([[10], [6], [2]])
    mask = (rng.random((3, 10)) < 0.5) & valid
    expected, _ = reconstruction_loss(predictions, values, mask, valid, 0.1)
    got = torch_reference.reconstruction_loss(*[torch.from_numpy(a) for a in
                                                (predictions, values, mask, valid)], 0.1)
    np.testing.assert_allclose(float(got), float(expected), rtol=1e-5)


def test_torch_step_bfloat16_autocast_trains_like_float32():
    """--dtype=bfloat16 runs the reference under autocast with float32 parameters: the first
    losses match float32 to bf16 precision, and the parameters stay float32."""
    cfg = common.BenchConfig(d_model=16, heads=2, layers=1, seq=16, batch=4, vocab=11)
    losses = {}
    for dtype in ("float32", "bfloat16"):
        runner = torch_reference.TorchStep(cfg, compiled=False, dtype=dtype)
        runner.step(0)
        losses[dtype] = runner.loss
        assert all(p.dtype == torch.float32 for p in runner.model.parameters())
    assert np.isfinite(losses["bfloat16"])
    np.testing.assert_allclose(losses["bfloat16"], losses["float32"], rtol=0.05)
    assert losses["bfloat16"] != losses["float32"]  # the bf16 path really ran in bf16


def test_compare_torch_pipelined_with_packing_reports_both_ratios(tmp_path):
    """compare_torch on a tiny shape, each round timed back to back: one mean per round and
    runner, JAX on packed rows holds more real tokens per step than the padded batches, and
    the two ratio lines are the ones the JSON's medians and token rates give."""
    json_path = tmp_path / "compare.json"
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.compare_torch", "--d_model=16", "--layers=1",
         "--heads=2", "--seq=128", "--batch=8", "--rounds=2", "--steps=3", "--warmup=1",
         "--no-compile", "--packing", "--timing=pipelined", f"--json={json_path}"],
        cwd=pathlib.Path(__file__).resolve().parents[1], capture_output=True, text=True,
        timeout=300, check=True).stdout
    record = json.loads(json_path.read_text())
    results = {r["name"]: r for r in record["results"]}
    assert list(results) == ["jax jit", "jax jit packed", "torch eager", "torch eager packed"]
    assert record["config"]["timing"] == "pipelined"
    assert all(len(record["times_s"][name]) == 2 for name in results)  # one mean per round
    padded, packed, torch_eager, torch_packed = results.values()
    assert packed["real_tokens_per_step"] > padded["real_tokens_per_step"]
    assert padded["real_tokens_per_step"] == torch_eager["real_tokens_per_step"]
    assert packed["real_tokens_per_step"] == torch_packed["real_tokens_per_step"]
    fastest = max((torch_eager, torch_packed), key=lambda r: r["tokens_per_s"])
    per_token = re.search(rf"^time per real token, jax packed/{fastest['name']} = ([\d.]+) ",
                          out, re.MULTILINE)
    assert per_token, out
    assert float(per_token.group(1)) == pytest.approx(
        fastest["tokens_per_s"] / packed["tokens_per_s"], abs=1e-3)
    last = out.strip().splitlines()[-1]
    assert last == f"ratio jax/torch_best = {padded['median_s'] / torch_eager['median_s']:.3f}"
    # The JSON carries the printed headline numbers; torch rows use torch's own ceiling.
    assert record["ratio_jax_torch_best"] == pytest.approx(
        padded["median_s"] / torch_eager["median_s"])
    assert record["time_per_real_token_jax_packed_vs_fastest_torch"] == dict(
        ratio=pytest.approx(fastest["tokens_per_s"] / packed["tokens_per_s"]),
        against=fastest["name"])
    ceilings = record["matmul_ceiling_gflops"]
    assert torch_eager["ceiling_fraction"] == pytest.approx(
        torch_eager["achieved_gflops"] / ceilings["torch"])
    assert padded["ceiling_fraction"] == pytest.approx(padded["achieved_gflops"] / ceilings["jax"])
    assert record["bench_config"]["d_model"] == 16 and f"on {record['jax_devices']} device(s)" in out
