"""Writing the evaluation's PNG figures (matplotlib without a display)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from cvmae_jax.jsonio import atomic_path  # noqa: E402


def save_figure(fig, path: str) -> None:
    """Writes ``fig`` as a PNG atomically (tight layout, 120 dpi) and closes it."""
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=120)
    plt.close(fig)


def rotated_labels_height(labels: list[str], fontsize: float) -> float:
    """Inches that tick labels rotated by 90 degrees take below an axis (about 0.6 em per
    character), so a figure can grow by it instead of squeezing its plot."""
    return max(map(len, labels), default=0) * 0.6 * fontsize / 72
