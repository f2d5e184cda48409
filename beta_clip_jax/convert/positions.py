"""Long-CLIP "knowledge-preserved stretching" of the text positional table (spec 1.3).

77 rows -> 248: rows 0..19 are kept; rows 20..76 are linearly interpolated at ratio 4, filling
rows 20..243; the last 4 rows extrapolate the final step (P[76] - P[75]). The kept rows are the
well-trained short positions, so short texts embed as before.
"""

from collections.abc import Mapping
from typing import Any

import numpy as np

TEXT_POSITIONS_KEY = "text_model.embeddings.position_embedding.weight"


def stretch_positions(table: np.ndarray, target: int = 248, keep: int = 20) -> np.ndarray:
    """[N, D] -> [target, D]; target must be keep + (N - keep) * ratio for an integer ratio."""
    table = np.asarray(table, dtype=np.float32)
    n = table.shape[0]
    ratio, rem = divmod(target - keep, n - keep)
    if rem or ratio < 1 or n <= keep:
        raise ValueError(
            f"cannot stretch {n} positions to {target} keeping {keep}: "
            f"{target} - {keep} must be a positive multiple of {n} - {keep}"
        )
    r = np.arange(ratio, dtype=np.float32)[:, None] / ratio  # fractions 0, 1/ratio, ...
    # Interpolate between each consecutive pair (keep..n-2, keep+1..n-1).
    lo, hi = table[keep : n - 1], table[keep + 1 : n]
    mid = (lo[:, None] * (1 - r) + hi[:, None] * r).reshape(-1, table.shape[1])
    # Past the last row, continue its final step.
    tail = table[n - 1] + r * (table[n - 1] - table[n - 2])
    return np.concatenate([table[:keep], mid, tail], axis=0)


def adapt_text_positions(
    state_dict: Mapping[str, Any], context_length: int, keep: int = 20
) -> dict[str, Any]:
    """Stretches the HF text positional table when the model asks for a longer context.

    A table already of `context_length` rows is left as is; any other mismatch is left for the
    shape check to report by name.
    """
    out = dict(state_dict)
    table = out.get(TEXT_POSITIONS_KEY)
    if table is None or np.shape(table)[0] == context_length:
        return out
    if np.shape(table)[0] < context_length:
        out[TEXT_POSITIONS_KEY] = stretch_positions(np.asarray(table), context_length, keep)
    return out
