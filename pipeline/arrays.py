"""Columns between Python/numpy and Arrow through their buffers: pyarrow's own conversions (pa.array,
pa.table, to_numpy) import pandas to look for its types, a third of a second of the start-up of a
stage that never uses it; these also copy nothing where they need not."""

from __future__ import annotations

import numpy as np
import pyarrow as pa


def as_arrow(values: np.ndarray) -> pa.Array:
    """A one-dimensional numeric numpy array as an Arrow array of the same type (no nulls)."""
    values = np.ascontiguousarray(values)
    return pa.Array.from_buffers(pa.from_numpy_dtype(values.dtype), len(values), [None, pa.py_buffer(values)])


def arrow_indices(positions: np.ndarray) -> pa.Array:
    """Row positions as an Arrow int64 array for ``take``."""
    return as_arrow(np.asarray(positions, dtype=np.int64))


def as_numpy(column: pa.Array | pa.ChunkedArray, dtype=np.int64) -> np.ndarray:
    """A numeric column without nulls as one numpy array of ``dtype``."""
    parts = []
    for chunk in column.chunks if isinstance(column, pa.ChunkedArray) else [column]:
        if not len(chunk):  # an empty chunk may have no data buffer at all
            continue
        if not (pa.types.is_integer(chunk.type) or pa.types.is_floating(chunk.type)) or chunk.null_count:
            raise ValueError(f"expected numbers without nulls, got {chunk.type} with {chunk.null_count} nulls")
        parts.append(np.frombuffer(chunk.buffers()[1], dtype=chunk.type.to_pandas_dtype(), count=len(chunk),
                                   offset=chunk.offset * chunk.type.byte_width))
    return np.concatenate(parts).astype(dtype, copy=False) if parts else np.zeros(0, dtype=dtype)


def as_arrow_strings(values: list[str]) -> pa.Array:
    """Python strings as an Arrow string array (no nulls)."""
    data = [value.encode("utf-8") for value in values]
    offsets = np.zeros(len(data) + 1, dtype=np.int32)
    np.cumsum([len(d) for d in data], out=offsets[1:])
    return pa.Array.from_buffers(pa.string(), len(data), [None, pa.py_buffer(offsets), pa.py_buffer(b"".join(data))])
