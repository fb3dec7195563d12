"""One host->device copy per train batch: the batch's fields packed into one int32 array.

Each array put on a device costs the host a fixed amount: profiled on an H200 host, ``train.py``
spent ~0.28 ms per field, ~1.4 ms per step for the five fields of a padded batch (seven when
packed), while the whole ``large`` bf16 step takes 2.28 ms on that GPU (benchmarks/NOTES.md).
``pack`` lays the fields side by side as int32 bits on the host (float32 by bit
pattern, bool as 0/1, per-row fields repeated along the row), so the step takes one array;
``unpack`` recovers the exact fields inside the compiled step. The copy grows from 13 to 20
bytes per token for a padded batch; on the CPU it still took 183 us (+22 us packing) against
447 us for the five fields.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

PACKABLE = (np.dtype(np.float32), np.dtype(np.int32), np.dtype(np.bool_))


class Field(NamedTuple):
    name: str
    dtype: np.dtype
    shape: tuple[int, ...]  # [b, L], or [b] (stored in every column of its row)


def layout_of(batch: dict[str, np.ndarray]) -> tuple[Field, ...]:
    """The packed layout of ``batch``: fields [b, L] or [b] of float32, int32 or bool."""
    rows, length = batch["valid"].shape
    layout = []
    for name, value in sorted(batch.items()):
        if value.dtype not in PACKABLE or value.shape not in ((rows, length), (rows,)):
            raise ValueError(f"batch field {name!r}: {value.dtype} {value.shape} cannot be "
                             f"packed (expected float32, int32 or bool of shape "
                             f"{(rows, length)} or {(rows,)})")
        layout.append(Field(name, value.dtype, value.shape))
    return tuple(layout)


def pack(batch: dict[str, np.ndarray], layout: tuple[Field, ...]) -> np.ndarray:
    """dict of [b, L] / [b] host arrays -> int32 [b, L, F], F = len(layout)."""
    if sorted(batch) != [field.name for field in layout]:
        raise ValueError(f"batch fields {sorted(batch)} differ from the compiled step's "
                         f"{[field.name for field in layout]}")
    rows, length = next(field.shape for field in layout if len(field.shape) == 2)
    packed = np.empty((rows, length, len(layout)), np.int32)
    for i, field in enumerate(layout):
        value = batch[field.name]
        if value.dtype != field.dtype or value.shape != field.shape:
            raise ValueError(f"batch field {field.name!r} is {value.dtype} {value.shape}, the "
                             f"compiled step takes {field.dtype} {field.shape}")
        value = value.view(np.int32) if field.dtype == np.float32 else value
        packed[..., i] = value[:, None] if len(field.shape) == 1 else value
    return packed


def unpack(packed: jax.Array, layout: tuple[Field, ...]) -> dict[str, jax.Array]:
    """int32 [b, L, F] -> the batch dict, bit for bit (inside a compiled step)."""
    batch = {}
    for i, field in enumerate(layout):
        value = packed[:, 0, i] if len(field.shape) == 1 else packed[..., i]
        if field.dtype == np.float32:
            value = jax.lax.bitcast_convert_type(value, jnp.float32)
        elif field.dtype == np.bool_:
            value = value != 0
        batch[field.name] = value
    return batch
