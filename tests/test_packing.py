"""Packed texts: the same embeddings, losses and gradients as padded texts, on 1 and 8 devices.

The packed batch is built by data/packing.py from the unpacked one; the comparison is against
the unpacked model path (each text alone in its own padded row), whose towers other tests check
against transformers.
"""

import functools

import jax
import numpy as np
import optax
import pytest
from helpers_tiny import random_params
from train_helpers import tiny_config

from beta_clip_jax import sharding
from beta_clip_jax import step as step_lib
from beta_clip_jax.config_check import check_config, resolve_config
from beta_clip_jax.data import packing
from beta_clip_jax.methods import build_model

SOT, EOT = 49406, 49407
B, S, KP, LC, LS, LP = 16, 2, 3, 24, 16, 8


def _row(rng, n, length):
    row = np.zeros(length, np.int32)
    row[0], row[n - 1] = SOT, EOT
    row[1 : n - 1] = rng.integers(0, 49000, n - 2)  # id 0 included: a real token, not padding
    return row


def unpacked_batch(seed=0, size=B):
    """Random texts of varied lengths; some phrase slots empty, one caption filling its row."""
    rng = np.random.default_rng(seed)
    cap = np.stack([_row(rng, int(rng.integers(3, LC + 1)), LC) for _ in range(size)])
    cap[1] = _row(rng, LC, LC)  # an over-long caption, cut with its EOT kept last
    sent = np.stack([[_row(rng, int(rng.integers(3, LS + 1)), LS) for _ in range(S)] for _ in cap])
    phr = np.stack([[_row(rng, int(rng.integers(3, LP + 1)), LP) for _ in range(KP)] for _ in cap])
    valid = np.ones((size, 1 + S + KP), bool)
    valid[::3, -1] = valid[::5, -2] = False
    phr[~valid[:, 1 + S :]] = 0
    sent[5, 1], valid[5, 2] = 0, False  # an image with one sentence only
    return {
        "image": rng.integers(0, 256, (size, 32, 32, 3), dtype=np.uint8),
        "caption": cap,
        "sentences": sent,
        "phrases": phr,
        "valid": valid,
        "_counts": np.zeros((size, 2), np.int32),
    }


def test_group_images_follow_strided_micro_batches():
    groups = packing.group_images(16, group=2, micro_batches=2)
    assert groups.tolist()[:4] == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert sorted(groups.ravel().tolist()) == list(range(16))
    for j in range(2):  # micro-batch j: images j::2, groups j::2, group q holding q*2, q*2+1
        images = np.arange(16)[j::2]
        np.testing.assert_array_equal(groups[j::2].ravel(), images)
    with pytest.raises(ValueError, match="multiple of 6"):
        packing.group_images(16, group=3, micro_batches=2)


def test_pack_batch_layout_and_counted_drops():
    batch = unpacked_batch()
    levels, lengths = packing.slot_tokens(batch)
    groups = packing.group_images(B, 4)
    # One row fewer than the fullest group needs, but room for every caption and sentence:
    # some phrases cannot fit.
    need = lambda g, k: packing.rows_needed([n for n in lengths[g, :k].ravel() if n], LC)
    rows = max(need(g, 1 + S + KP) for g in groups) - 1
    assert rows >= max(need(g, 1 + S) for g in groups)
    packed = packing.pack_batch(batch, row_length=LC, rows_per_group=rows, group=4, drop_counter=1)
    dropped = batch["valid"] & ~packed["valid"]
    assert packed["_counts"][:, 1].tolist() == dropped.sum(axis=1).tolist()
    assert dropped.any() and not dropped[:, : 1 + S].any()  # only phrases are dropped
    for c, images in enumerate(groups):
        flat = {k: packed[k][c].reshape(-1) for k in ("text_tokens", "text_positions")}
        segs = packed["text_segments"][c]
        for t, b in enumerate(images):
            for k in np.flatnonzero(packed["valid"][b]):
                n, end = lengths[b, k], packed["text_eot"][c, t, k]
                start = end - n + 1
                rows_b = [r for x in levels for r in x[b].reshape(-1, x.shape[-1])]
                want = rows_b[k][:n]
                np.testing.assert_array_equal(flat["text_tokens"][start : end + 1], want)
                np.testing.assert_array_equal(flat["text_positions"][start : end + 1], np.arange(n))
                row, col = divmod(int(start), LC)
                assert col + n <= LC and len(set(segs[row, col : col + n].tolist())) == 1
    # The image with the most phrases loses its last one first.
    b = int(np.flatnonzero(dropped.any(axis=1))[0])
    assert dropped[b, -1] or not batch["valid"][b, -1]


def _model():
    return build_model({"variant": "tiny", "context_length": LC})


@pytest.mark.parametrize("micro_batches", [1, 2])
def test_packed_embeddings_equal_unpacked(micro_batches):
    model, batch = _model(), unpacked_batch(1)
    params = random_params(model, seed=2)
    packed = packing.pack_batch(
        batch, row_length=LC, rows_per_group=8, group=2, micro_batches=micro_batches
    )
    assert (packed["valid"] == batch["valid"]).all()  # the budget holds every text here
    encode = jax.jit(lambda p, t: model.apply({"params": p}, t, method="encode_texts"))
    for j in range(micro_batches):  # as the step sees them: micro-batch j = rows j::n
        part = lambda x, j=j: x[j::micro_batches]
        un = encode(params, {k: part(batch[k]) for k in packing.TEXT_KEYS})
        pk = encode(params, {k: part(packed[k]) for k in packing.PACKED_KEYS})
        valid = part(batch["valid"])
        np.testing.assert_allclose(np.asarray(pk)[valid], np.asarray(un)[valid], atol=2e-5)


def _config(mode, packed, **overrides):
    c = tiny_config(
        batch_size=2 * B,
        **{
            "loss.mode": mode,
            "loss.group_size": 4,
            "optim.grad_accum": 2,
            "data.max_sentences": S,
            "data.max_phrases": KP,
            "data.caption_length": LC,
            "data.sentence_length": LS,
            "data.phrase_length": LP,
            "model.context_length": LC,
            **overrides,
        },
    )
    c.data.pack_texts, c.data.pack_group = packed, 2
    return resolve_config(c)


def _train_step(config):
    model = build_model(config.model)
    tx = optax.sgd(0.5)
    fn = functools.partial(
        step_lib.train_step, model=model, tx=tx, loss_cfg=config.loss, grad_accum=2
    )
    return jax.jit(fn), model, tx


@pytest.mark.parametrize("mode", ["ce", "bce"])
def test_packed_step_equals_unpacked_step(mode):
    """Loss, metrics and the updated parameters of one SGD step (2 accumulated micro-batches):
    packed equals unpacked to 1e-5 relative, on 1 device and on 8 data-parallel devices."""
    batch = unpacked_batch(3, size=2 * B)  # 8 devices x 2 micro-batches x a group of 2
    packed = packing.pack_batch(batch, row_length=LC, rows_per_group=8, group=2, micro_batches=2)
    results = []
    for texts, devices in ((batch, 1), (packed, 1), (packed, 8)):
        config = _config(mode, "text_tokens" in texts)
        check_config(config, devices, 1)
        step, model, tx = _train_step(config)
        params = random_params(model, seed=4)
        state = step_lib.TrainState(np.int32(0), params, tx.init(params))
        inputs = {k: v for k, v in texts.items() if k != "_counts"}
        if devices > 1:  # the batch sharded over 8 data-parallel devices, the state replicated
            config.mesh.num_devices = devices
            mesh = sharding.make_mesh(config.mesh)
            state = jax.device_put(state, sharding.replicated(mesh))
            inputs = jax.device_put(inputs, sharding.batch_sharding(mesh))
            with jax.set_mesh(mesh):
                new, metrics = step(state, inputs)
        else:
            new, metrics = step(state, inputs)
        results.append((jax.device_get(new.params), jax.device_get(metrics)))
    (ref_p, ref_m), others = results[0], results[1:]
    for params, metrics in others:
        for key in ("loss", "loss_global", "loss_cal", "grad_norm"):
            np.testing.assert_allclose(metrics[key], ref_m[key], rtol=1e-5, err_msg=key)
        for (path, a), b in zip(
            jax.tree_util.tree_flatten_with_path(params)[0], jax.tree.leaves(ref_p), strict=True
        ):
            np.testing.assert_allclose(
                a, b, rtol=1e-5, atol=1e-7, err_msg=jax.tree_util.keystr(path)
            )


def test_pipeline_packs_batches_with_a_process_independent_budget(tmp_path):
    """The input pipeline packs in its workers: each packed batch is pack_batch of the unpacked
    batch of the same stream position, with rows per group measured on records sampled from the
    whole file (the same for every process) or given as data.pack_budget."""
    from test_data_sources import make_jsonl
    from test_pipeline import config as data_config

    from beta_clip_jax.data import pipeline
    from beta_clip_jax.tokenizer import Tokenizer

    path, _ = make_jsonl(str(tmp_path), n=24)
    tok = Tokenizer()

    def iterator(process_index=0, **overrides):
        cfg = data_config("jsonl", path, **overrides)
        return pipeline.build_train_iterator(
            cfg, batch_size_per_process=4, seed=1, image_size=8, tokenizer=tok,
            process_index=process_index, process_count=2, micro_batches=2,
        )  # fmt: skip

    plain = next(iterator())
    packed_it = iterator(pack_texts=True, pack_group=2)
    packed = next(packed_it)
    rows = packed["text_tokens"].shape[1]
    other = next(iterator(1, pack_texts=True, pack_group=2))
    assert other["text_tokens"].shape == packed["text_tokens"].shape  # same shapes everywhere
    plain["_counts"] = np.zeros((4, len(pipeline.COUNTERS)), np.int32)
    want = packing.pack_batch(plain, row_length=32, rows_per_group=rows, group=2, micro_batches=2)
    for key in (*packing.PACKED_KEYS, "valid", "image"):
        np.testing.assert_array_equal(packed[key], want[key], err_msg=key)
    assert packed_it.metrics()["data/pack_dropped_phrases"] == 0
    # A budget too small for every phrase: drops, counted.
    tight = iterator(pack_texts=True, pack_group=2, pack_budget=40)
    batch = next(tight)
    assert batch["text_tokens"].shape[1] == packing.rows_for_budget(40, group=2, row_length=32)
    dropped = tight.metrics()["data/pack_dropped_phrases"]
    assert dropped == int((plain["valid"] & ~batch["valid"]).sum()) > 0
