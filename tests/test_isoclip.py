"""IsoCLIP: the filter vs the official code's W-orientation equations, identity band, bias path,
metrics."""

import flax.linen as nn
import numpy as np
import pytest

from beta_clip_jax.evals import metrics
from beta_clip_jax.methods import isoclip


def _kernels(d_v=12, d_t=8, d=8, seed=0):
    rng = np.random.default_rng(seed)
    return (
        rng.normal(size=(d_v, d)).astype(np.float32),
        rng.normal(size=(d_t, d)).astype(np.float32),
    )


def _np_iso(w_i, w_t, k_top, k_bottom):
    """The official construction literally: W maps feature -> embedding; Psi = W_i^T W_t;
    W_hat = W U_k U_k^T."""
    psi = w_i.T @ w_t
    u, s, vt = np.linalg.svd(psi, full_matrices=False)
    r = len(s)
    u_k, v_k = u[:, k_top : r - k_bottom], vt.T[:, k_top : r - k_bottom]
    return w_i @ u_k @ u_k.T, w_t @ v_k @ v_k.T


def test_filter_matches_spec_equations():
    k_img, k_txt = _kernels()
    got_img, got_txt = isoclip.isoclip_filter(k_img, k_txt, 2, 3)
    w_i, w_t = _np_iso(k_img.T.astype(np.float64), k_txt.T.astype(np.float64), 2, 3)
    np.testing.assert_allclose(got_img, w_i.T, atol=1e-12)
    np.testing.assert_allclose(got_txt, w_t.T, atol=1e-12)
    # The kept band is a projector: the filtered kernels have rank r - k_top - k_bottom.
    assert np.linalg.matrix_rank(got_img) == 3
    assert got_img.shape == k_img.shape and got_txt.shape == k_txt.shape


def test_zero_band_returns_projections_exactly():
    k_img, k_txt = _kernels()
    params = {  # models/clip.py's layout: bias-free Dense projections
        "visual": {"proj": {"kernel": k_img}, "other": np.ones(3)},
        "text": {"proj": {"kernel": k_txt}},
        "logit_scale": np.float32(4.6),
    }
    out = isoclip.apply_isoclip(params, 0, 0)
    assert out["visual"]["proj"]["kernel"].dtype == np.float32
    np.testing.assert_array_equal(out["visual"]["proj"]["kernel"], k_img)
    np.testing.assert_array_equal(out["text"]["proj"]["kernel"], k_txt)
    np.testing.assert_array_equal(out["visual"]["other"], params["visual"]["other"])
    f_img, f_txt = isoclip.isoclip_filter(k_img, k_txt, 0, 0)
    np.testing.assert_allclose(f_img, k_img, atol=1e-12)
    np.testing.assert_allclose(f_txt, k_txt, atol=1e-12)


def test_band_errors_and_variants():
    k_img, k_txt = _kernels()
    with pytest.raises(ValueError, match="rank-8"):
        isoclip.isoclip_filter(k_img, k_txt, 5, 3)
    with pytest.raises(ValueError):
        isoclip.isoclip_filter(k_img, k_txt, -1, 0)
    assert isoclip.canonical_variant("ViT-B-16") == "B/16"
    assert isoclip.canonical_variant("L/14") == "L/14"
    with pytest.raises(KeyError, match="no published"):
        isoclip.filter_checkpoint({}, "H/14")
    with pytest.raises(KeyError, match="no projection at visual/proj"):
        isoclip.apply_isoclip({"visual": {"head": k_img}}, 1, 1)


def test_per_modality_bands_bias_and_boxed_leaves():
    k_img, k_txt = _kernels(d_v=10, d_t=9, d=8)
    rng = np.random.default_rng(3)
    b_img, b_txt = rng.normal(size=8), rng.normal(size=8)
    params = {
        "visual": {"proj": {"kernel": k_img, "bias": b_img}},
        "text": {"text_projection": nn.LogicallyPartitioned(k_txt, ("embed", None))},
    }
    params["text"]["text_projection"] = {
        "kernel": params["text"]["text_projection"],
        "bias": b_txt,
    }
    out, info = isoclip.filter_checkpoint(
        params, image_band=(1, 2), text_band=(3, 2), text_path=("text", "text_projection")
    )

    aug_i = np.concatenate([k_img, b_img[None]]).T  # W acting on [f, 1]
    aug_t = np.concatenate([k_txt, b_txt[None]]).T
    w_i = _np_iso(aug_i, aug_t, 1, 2)[0].T
    w_t = _np_iso(aug_i, aug_t, 3, 2)[1].T
    vis = out["visual"]["proj"]
    np.testing.assert_allclose(vis["kernel"], w_i[:-1], atol=1e-5)
    np.testing.assert_allclose(vis["bias"], w_i[-1], atol=1e-5)
    txt = out["text"]["text_projection"]
    assert isinstance(txt["kernel"], nn.LogicallyPartitioned)
    assert txt["kernel"].names == ("embed", None)
    np.testing.assert_allclose(txt["kernel"].unbox(), w_t[:-1], atol=1e-5)
    np.testing.assert_allclose(txt["bias"], w_t[-1], atol=1e-5)
    assert info["spectrum"][0] == 1.0 and info["image_band"] == (1, 2)
    # The input tree is untouched.
    np.testing.assert_array_equal(params["visual"]["proj"]["kernel"], k_img)


def _np_metrics(q, ql, g, gl, same_set):
    q = q / np.linalg.norm(q, axis=1, keepdims=True)
    g = g / np.linalg.norm(g, axis=1, keepdims=True)
    out = {"map": [], "map_at_r": [], "p_at_r": [], "r1": []}
    for i in range(len(q)):
        idx = [j for j in range(len(g)) if not (same_set and j == i)]
        ranked = sorted(idx, key=lambda j: -float(q[i] @ g[j]))
        rel = [gl[j] == ql[i] for j in ranked]
        r = sum(rel)
        if r == 0:
            continue
        precs = [sum(rel[: k + 1]) / (k + 1) for k in range(len(rel))]
        out["map"].append(sum(p for p, h in zip(precs, rel, strict=True) if h) / r)
        out["map_at_r"].append(sum(p for p, h in zip(precs[:r], rel[:r], strict=True) if h) / r)
        out["p_at_r"].append(sum(rel[:r]) / r)
        out["r1"].append(float(rel[0]))
    return {k: 100 * np.mean(v) for k, v in out.items()}


def test_retrieval_metrics_match_brute_force():
    rng = np.random.default_rng(5)
    emb = rng.normal(size=(23, 6))
    labels = rng.integers(0, 4, size=23)
    labels[0] = 9  # a class of one: no relevant item, skipped
    got = metrics.image_to_image(emb, labels, chunk=7)
    want = _np_metrics(emb, labels, emb, labels, same_set=True)
    for key in want:
        np.testing.assert_allclose(got[key], want[key], rtol=1e-9)

    gal, gal_labels = rng.normal(size=(17, 6)), rng.integers(0, 4, size=17)
    got = metrics.image_to_image(emb[1:], labels[1:], gal, gal_labels)
    want = _np_metrics(emb[1:], labels[1:], gal, gal_labels, same_set=False)
    for key in want:
        np.testing.assert_allclose(got[key], want[key], rtol=1e-9)


def test_text_to_text_protocol():
    rng = np.random.default_rng(6)
    ids = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2, 3, 3])
    emb = rng.normal(size=(len(ids), 5))
    got = metrics.text_to_text(emb, ids)
    first = [0, 3, 5, 9]
    rest = [i for i in range(len(ids)) if i not in first]
    want = _np_metrics(emb[first], ids[first], emb[rest], ids[rest], same_set=False)
    for key in want:
        np.testing.assert_allclose(got[key], want[key], rtol=1e-9)


def test_apply_command_core_writes_filtered_params(tmp_path):
    from flax import serialization

    from beta_clip_jax.methods import isoclip_apply

    k_img, k_txt = _kernels()
    params = {"visual": {"proj": {"kernel": k_img}}, "text": {"proj": {"kernel": k_txt}}}
    isoclip_apply.run(
        "fake:x",
        str(tmp_path),
        image_band=(1, 2),
        text_band=(0, 3),
        load=lambda _: (params, {"variant": "tiny"}),
    )
    with open(tmp_path / "params.msgpack", "rb") as f:
        saved = serialization.msgpack_restore(f.read())
    want_img = isoclip.isoclip_filter(k_img, k_txt, 1, 2)[0]
    want_txt = isoclip.isoclip_filter(k_img, k_txt, 0, 3)[1]
    np.testing.assert_allclose(saved["visual"]["proj"]["kernel"], want_img, atol=1e-5)
    np.testing.assert_allclose(saved["text"]["proj"]["kernel"], want_txt, atol=1e-5)
    assert (tmp_path / "isoclip.json").exists()
