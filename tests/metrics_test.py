"""Progress lines: the logged throughput is the window's, the ETA the run's pace."""

from cvmae_jax.metrics import Progress


def test_progress_shows_the_window_throughput_not_the_run_average():
    progress = Progress(total_steps=1000, start_step=0)
    line = progress.line(100, dict(loss=0.5, steps_per_sec=123.4, tokens_per_sec=5678.0))
    assert "123.40 steps/s 5678 tok/s" in line and line.startswith("step 100/1000 | loss 0.5000")
