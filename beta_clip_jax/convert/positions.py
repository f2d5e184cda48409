"""Long-CLIP "knowledge-preserved stretching" of the text positional table.

77 rows -> 248: rows 0..19 are kept; rows 20..76 are linearly interpolated at ratio 4, filling
rows 20..243; the last 4 rows extrapolate the final step (P[76] - P[75]). The kept rows are the
well-trained short positions, so short texts embed as before.

Long-CLIP and β-CLIP training checkpoints hold two stretched tables, a frozen one whose first 20
rows are used and a trained one (`positional_embedding_res`) used from row 20 on;
`effective_text_positions` merges them into the single table our model holds.
"""

from collections.abc import Mapping
from typing import Any

import numpy as np

TEXT_POSITIONS_KEY = "text_model.embeddings.position_embedding.weight"
# The trained copy's name in Long-CLIP and β-CLIP files (the frozen one is positional_embedding).
RES_POSITIONS_KEY = "positional_embedding_res"
# Rows kept from the 77-row table and, in two-table files, taken from the frozen copy.
KEEP = 20


def effective_text_positions(frozen, res, keep: int = KEEP) -> np.ndarray:
    """Rows 0..keep-1 of the frozen table, rows keep.. of the trained one (float32)."""
    frozen, res = np.asarray(frozen, np.float32), np.asarray(res, np.float32)
    if frozen.shape != res.shape or frozen.ndim != 2:
        raise ValueError(
            f"positional tables differ: positional_embedding {frozen.shape} vs "
            f"{RES_POSITIONS_KEY} {res.shape}"
        )
    return np.concatenate([frozen[:keep], res[keep:]], axis=0)


def stretch_positions(table: np.ndarray, target: int = 248, keep: int = KEEP) -> np.ndarray:
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
    state_dict: Mapping[str, Any], context_length: int, keep: int = KEEP
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
