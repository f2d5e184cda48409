"""ROI-align on one [h, w, C] feature grid, with torchvision's `roi_align` conventions.

FG-OVD scoring (FG-CLIP v1, beta-CLIP) pools each box from the patch grid with
`roi_align(output_size=1, spatial_scale=1, sampling_ratio=-1, aligned=True)`; we reproduce that
rule in NumPy so no torchvision is needed:

* aligned=True shifts box corners by -0.5 so pixel centres sit at integer coordinates;
* each output bin averages grid_h x grid_w bilinear samples at the centres of a regular sub-grid,
  with grid = sampling_ratio, or ceil(roi size / output size) when sampling_ratio <= 0;
* a sample with y < -1 or y > H (same for x) contributes zero; otherwise coordinates are clamped
  to [0, H-1] before bilinear interpolation;
* the arithmetic runs in the features' precision, as torchvision's kernel does: the number of
  samples is a ceil() of a box size, so a box edge at 14 that float64 computes as
  14.000000000000002 would take 15 samples instead of 14 and move the box vector by ~1e-4.
"""

from __future__ import annotations

import math

import numpy as np

from beta_clip_jax.mathutil import l2_normalize


def _bilinear(features: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """Bilinear samples of features [H, W, C] at every (ys[i], xs[j]) -> [len(ys), len(xs), C]."""
    height, width = features.shape[:2]

    def axis_weights(coords: np.ndarray, size: int):
        inside = (coords >= -1.0) & (coords <= size)
        c = np.maximum(coords, 0.0)
        low = np.floor(c).astype(np.int64)
        at_edge = low >= size - 1
        low = np.where(at_edge, size - 1, low)
        high = np.where(at_edge, size - 1, low + 1)
        c = np.where(at_edge, low.astype(c.dtype), c)
        frac = c - low.astype(c.dtype)
        return low, high, (1.0 - frac) * inside, frac * inside

    y0, y1, wy0, wy1 = axis_weights(ys, height)
    x0, x1, wx0, wx1 = axis_weights(xs, width)
    f = features
    return (
        (wy0[:, None] * wx0[None, :])[..., None] * f[y0[:, None], x0[None, :]]
        + (wy0[:, None] * wx1[None, :])[..., None] * f[y0[:, None], x1[None, :]]
        + (wy1[:, None] * wx0[None, :])[..., None] * f[y1[:, None], x0[None, :]]
        + (wy1[:, None] * wx1[None, :])[..., None] * f[y1[:, None], x1[None, :]]
    )


def roi_align(
    features: np.ndarray,
    boxes: np.ndarray,
    output_size: int | tuple[int, int] = 1,
    spatial_scale: float = 1.0,
    sampling_ratio: int = -1,
    aligned: bool = True,
) -> np.ndarray:
    """Pool boxes from features [H, W, C]; boxes [N, 4] as (x1, y1, x2, y2) in input coordinates.

    Returns [N, out_h, out_w, C] in the features' float dtype (float64 for integer features);
    spatial_scale maps box coordinates to grid cells, as in torchvision.
    """
    features = np.asarray(features)
    dt = features.dtype if np.issubdtype(features.dtype, np.floating) else np.dtype(np.float64)
    features = features.astype(dt, copy=False)
    if features.ndim != 3:
        raise ValueError(f"features must be [H, W, C], got shape {features.shape}")
    boxes = np.asarray(boxes, dt).reshape(-1, 4)
    out_h, out_w = (output_size, output_size) if isinstance(output_size, int) else output_size
    channels = features.shape[2]
    offset, scale = dt.type(0.5 if aligned else 0.0), dt.type(spatial_scale)
    out = np.zeros((len(boxes), out_h, out_w, channels), dt)
    for n, (x1, y1, x2, y2) in enumerate(boxes):
        start_x, start_y = x1 * scale - offset, y1 * scale - offset
        roi_w = x2 * scale - offset - start_x
        roi_h = y2 * scale - offset - start_y
        if not aligned:
            # Legacy behaviour: malformed boxes are forced to 1x1.
            roi_w, roi_h = max(roi_w, dt.type(1.0)), max(roi_h, dt.type(1.0))
        bin_h, bin_w = roi_h / dt.type(out_h), roi_w / dt.type(out_w)
        grid_h = sampling_ratio if sampling_ratio > 0 else math.ceil(roi_h / dt.type(out_h))
        grid_w = sampling_ratio if sampling_ratio > 0 else math.ceil(roi_w / dt.type(out_w))
        if grid_h <= 0 or grid_w <= 0:
            continue  # An empty box: torchvision averages no samples and returns zeros.
        # Sample coordinates for every output bin: [out, grid] flattened in bin-major order,
        # each start + bin * b + (i + 0.5) * bin / grid, in torchvision's order of operations.
        sub_y = (np.arange(grid_h, dtype=dt) + dt.type(0.5)) * bin_h / dt.type(grid_h)
        sub_x = (np.arange(grid_w, dtype=dt) + dt.type(0.5)) * bin_w / dt.type(grid_w)
        ys = (start_y + np.arange(out_h, dtype=dt)[:, None] * bin_h + sub_y[None, :]).ravel()
        xs = (start_x + np.arange(out_w, dtype=dt)[:, None] * bin_w + sub_x[None, :]).ravel()
        samples = _bilinear(features, ys, xs)
        samples = samples.reshape(out_h, grid_h, out_w, grid_w, channels)
        out[n] = samples.sum(axis=(1, 3)) / dt.type(grid_h * grid_w)
    return out


def box_features(
    grid: np.ndarray, boxes_xywh: np.ndarray, image_hw: tuple[float, float]
) -> np.ndarray:
    """FG-OVD box vectors: boxes (x, y, w, h) in original image pixels -> L2-normalised [N, C].

    The box is mapped to grid units (x * gw / W, y * gh / H, ...) and pooled 1x1 with aligned,
    adaptive sampling, exactly the official FG-OVD evaluator's recipe (docs/evals.md, FG-OVD).
    """
    grid_h, grid_w = grid.shape[:2]
    img_h, img_w = image_hw
    b = np.asarray(boxes_xywh, np.float64).reshape(-1, 4)
    # x / W * g, in this order (the reference's), then float32 like its box tensor: 500 * (14 /
    # 500) is 14.000000000000002 in float64, which ceil() turns into an extra row of samples.
    xyxy = np.stack(
        [
            b[:, 0] / img_w * grid_w,
            b[:, 1] / img_h * grid_h,
            (b[:, 0] + b[:, 2]) / img_w * grid_w,
            (b[:, 1] + b[:, 3]) / img_h * grid_h,
        ],
        axis=1,
    ).astype(np.float32)
    grid = np.asarray(grid, np.float32)
    pooled = roi_align(grid, xyxy, output_size=1, spatial_scale=1.0, sampling_ratio=-1)[:, 0, 0]
    return l2_normalize(pooled, dtype=np.float64).astype(np.float32)
