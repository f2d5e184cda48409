"""IsoCLIP: training-free spectral filtering of the projections for intra-modal use.

docs/methods.md has the options and commands. With Flax kernels K_img `(d_v, d)` and K_txt
`(d_t, d)` (so z = f @ K), the inter-modal operator is Psi = K_img @ K_txt^T `(d_v, d_t)`. Its
thin SVD U S V^T splits into a steep top band, a flat middle band and a collapsing bottom band;
keeping only the middle columns j in [k_top, r - k_bottom) gives U_k, V_k and the filtered kernels

    K_img_iso = U_k U_k^T K_img,    K_txt_iso = V_k V_k^T K_txt     (shapes unchanged)

Filtered kernels are for image->image and text->text similarity only: cross-modal scoring must
keep the original kernels. The SVD runs once on the host in float64, outside jit.

Also here: the published bands (`BANDS`), `apply_isoclip` / `filter_checkpoint` on a params
tree, and `PARAM_FILTER`, which lets the intra-modal evaluator (evals/intramodal.py) report the
filtered scores beside the plain ones (its options iso_variant, iso_image_band, iso_text_band).
"""

from collections.abc import Mapping, Sequence

import numpy as np
from flax import traverse_util
from flax.core import unfreeze

from beta_clip_jax.methods.registry import ParamFilter, register_filter

# (k_top, k_bottom) per OpenAI backbone and modality, from the official scripts.
BANDS = {
    "B/32": {"image": (150, 50), "text": (20, 100)},
    "B/16": {"image": (200, 50), "text": (10, 50)},
    "L/14": {"image": (250, 200), "text": (10, 300)},
}
DEFAULT_BAND = (150, 50)  # the official README's default

# Where models/clip.py keeps the two projections: bias-free Dense layers, kernels
# `(width, embed)` under ".../kernel". A raw `(in, out)` array at the path works too.
IMAGE_PROJ_PATH = ("visual", "proj")
TEXT_PROJ_PATH = ("text", "proj")


def psi_svd(k_img, k_txt):
    """Thin SVD of Psi = K_img K_txt^T in float64 -> (U `(d_v, r)`, S `(r,)`, V `(d_t, r)`)."""
    k_img = np.asarray(k_img, np.float64)
    k_txt = np.asarray(k_txt, np.float64)
    if k_img.ndim != 2 or k_txt.ndim != 2 or k_img.shape[1] != k_txt.shape[1]:
        raise ValueError(
            f"projection kernels must be (in, d) with one d; got {k_img.shape}, {k_txt.shape}"
        )
    u, s, vt = np.linalg.svd(k_img @ k_txt.T, full_matrices=False)
    return u, s, vt.T


def band_slice(rank: int, k_top: int, k_bottom: int) -> slice:
    """Columns kept by the filter; rejects bands that remove everything."""
    if k_top < 0 or k_bottom < 0:
        raise ValueError(f"k_top and k_bottom must be >= 0; got {k_top}, {k_bottom}")
    if k_top + k_bottom >= rank:
        raise ValueError(
            f"cannot remove {k_top} top and {k_bottom} bottom directions of a rank-{rank} Psi"
        )
    return slice(k_top, rank - k_bottom)


def _filter(img, txt, image_band, text_band):
    u, s, v = psi_svd(img, txt)
    u_k = u[:, band_slice(s.shape[0], *image_band)]
    v_k = v[:, band_slice(s.shape[0], *text_band)]
    new_img = u_k @ (u_k.T @ np.asarray(img, np.float64))
    new_txt = v_k @ (v_k.T @ np.asarray(txt, np.float64))
    return new_img, new_txt, s


def isoclip_filter(k_img, k_txt, k_top: int, k_bottom: int):
    """Filtered kernels (K_img_iso, K_txt_iso), float64, same shapes as the inputs."""
    band = (k_top, k_bottom)
    return _filter(k_img, k_txt, band, band)[:2]


def spectrum(k_img, k_txt) -> np.ndarray:
    """sigma_j / sigma_1 of Psi: shows the three bands; a cheap health check during training."""
    s = psi_svd(k_img, k_txt)[1]
    return s / s[0]


def augment_bias(kernel, bias):
    """A biased projection f @ K + b as one kernel `(in + 1, out)` acting on [f, 1]."""
    return np.concatenate([np.asarray(kernel), np.asarray(bias)[None]], axis=0)


def split_bias(kernel_aug):
    """Inverse of `augment_bias`: -> (kernel `(in, out)`, bias `(out,)`)."""
    return kernel_aug[:-1], kernel_aug[-1]


def canonical_variant(variant: str) -> str:
    """ "ViT-B/16", "ViT-B-16", "b16" -> "B/16" (the keys of `BANDS`)."""
    name = variant.upper().replace("VIT", "").replace("-", "").replace("/", "")
    return f"{name[0]}/{name[1:]}" if name else variant


def _read(flat, path: Sequence[str]):
    """Kernel and optional bias at `path`: a raw `(in, out)` param or a Dense's dict."""
    path = tuple(path)
    if path in flat:
        return flat[path], None, path, None
    if path + ("kernel",) in flat:
        bias_key = path + ("bias",)
        return flat[path + ("kernel",)], flat.get(bias_key), path + ("kernel",), bias_key
    near = sorted("/".join(k) for k in flat if k[: len(path) - 1] == path[:-1])
    raise KeyError(f"no projection at {'/'.join(path)}; parameters beside it: {near}")


def _value(leaf):
    # Boxed (logically partitioned) leaves keep their box; the filter sees plain arrays.
    return np.asarray(leaf.unbox() if hasattr(leaf, "unbox") else leaf)


def _write(flat, key, new, old):
    new = np.asarray(new, dtype=_value(old).dtype)
    flat[key] = old.replace_boxed(new) if hasattr(old, "replace_boxed") else new


def filter_checkpoint(
    params: Mapping,
    variant: str | None = None,
    *,
    image_band: tuple[int, int] | None = None,
    text_band: tuple[int, int] | None = None,
    image_path: Sequence[str] = IMAGE_PROJ_PATH,
    text_path: Sequence[str] = TEXT_PROJ_PATH,
):
    """Params with each projection filtered by its own modality's band -> (params, info).

    Bands come from `BANDS[variant]` unless given; with neither, `DEFAULT_BAND` for both. One
    SVD serves both sides (the image side uses U, the text side V of the same Psi). The result
    is for intra-modal use only. `info` holds the bands used and the sigma_j / sigma_1 spectrum.
    Biased projections are filtered in the augmented [f, 1] form; Psi then has one more row
    and column than its rank, so keep k_bottom >= 1 there. The input is not modified.
    """
    if variant is not None:
        key = canonical_variant(variant)
        if key not in BANDS:
            raise KeyError(f"no published IsoCLIP band for {variant!r}; known: {sorted(BANDS)}")
        image_band = image_band or BANDS[key]["image"]
        text_band = text_band or BANDS[key]["text"]
    image_band = tuple(image_band or DEFAULT_BAND)
    text_band = tuple(text_band or DEFAULT_BAND)

    flat = traverse_util.flatten_dict(unfreeze(params))
    k_img, b_img, kimg_key, bimg_key = _read(flat, image_path)
    k_txt, b_txt, ktxt_key, btxt_key = _read(flat, text_path)
    img = _value(k_img) if b_img is None else augment_bias(_value(k_img), _value(b_img))
    txt = _value(k_txt) if b_txt is None else augment_bias(_value(k_txt), _value(b_txt))

    new_img, new_txt, s = _filter(img, txt, image_band, text_band)
    for new, kernel, k_key, bias, b_key in (
        (new_img, k_img, kimg_key, b_img, bimg_key),
        (new_txt, k_txt, ktxt_key, b_txt, btxt_key),
    ):
        if bias is None:
            _write(flat, k_key, new, kernel)
        else:
            new_kernel, new_bias = split_bias(new)
            _write(flat, k_key, new_kernel, kernel)
            _write(flat, b_key, new_bias, bias)
    info = {"image_band": image_band, "text_band": text_band, "spectrum": s / s[0]}
    return traverse_util.unflatten_dict(flat), info


def apply_isoclip(
    params: Mapping,
    k_top: int,
    k_bottom: int,
    *,
    image_path: Sequence[str] = IMAGE_PROJ_PATH,
    text_path: Sequence[str] = TEXT_PROJ_PATH,
):
    """Params with both projections filtered by one band (k_top, k_bottom); input unchanged."""
    band = (k_top, k_bottom)
    out, _ = filter_checkpoint(
        params, image_band=band, text_band=band, image_path=image_path, text_path=text_path
    )
    return out


def _band(value):
    return None if value is None else tuple(int(v) for v in value)


def _filter_from_options(params, options):
    filtered, _ = filter_checkpoint(
        params,
        options.get("iso_variant"),
        image_band=_band(options.get("iso_image_band")),
        text_band=_band(options.get("iso_text_band")),
    )
    return filtered


PARAM_FILTER = register_filter(
    ParamFilter(
        name="isoclip",
        prefix="iso_",
        options=("iso_variant", "iso_image_band", "iso_text_band"),
        paths=(IMAGE_PROJ_PATH, TEXT_PROJ_PATH),
        apply=_filter_from_options,
    )
)
