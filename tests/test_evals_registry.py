"""Evaluator registry from config, the console table, and the synthetic-scenes evaluator."""

import ml_collections
import numpy as np
import pytest
from test_evals_datasets import make_urban1k
from test_evals_fakes import ColourFake, IdFake, quadrant_image

from beta_clip_jax.evals import registry
from beta_clip_jax.evals.synthetic_eval import (
    SyntheticEvaluator,
    box_patch_mask,
    synthetic_scores,
)


def test_build_from_config_dict_and_run(tmp_path):
    root = make_urban1k(str(tmp_path / "u"), [1, 2, 3])
    cfg = ml_collections.ConfigDict()
    cfg.urban = dict(kind="urban1k", root=root, every=10, batch_size=2)
    cfg.quick = dict(kind="urban1k", root=root, every=0, max_examples=2)
    evaluators = sorted(registry.build_evaluators(cfg), key=lambda e: e.name != "urban")
    assert [e.name for e in evaluators] == ["urban", "quick"]
    assert [e.should_run(20) for e in evaluators] == [True, False]
    assert not evaluators[0].should_run(15)
    results = registry.run_evaluators(evaluators, IdFake(), step=20)
    assert list(results) == ["urban"]
    assert set(registry.run_evaluators(evaluators, IdFake())) == {"urban", "quick"}
    flat = registry.flatten(results)
    assert flat["eval/urban/t2i_r1"] == results["urban"]["t2i_r1"]
    assert registry.build_evaluators(None) == []
    (syn,) = registry.build_evaluators({"s": {"kind": "synthetic"}}, image_size=16)
    assert syn.image_size_hint == 16 and syn.num_examples == 64


def test_unknown_kind_lists_known_kinds():
    with pytest.raises(ValueError, match="unknown kind 'imagenet'.*coco.*urban1k"):
        registry.build_evaluators({"x": {"kind": "imagenet"}})


def test_format_table_labels_text_conditioned_scores():
    table = registry.format_table(
        {
            "urban1k": {"t2i_r1": 88.6, "i2t_r1": 89.0, "tci_t2i_r1": 91.0, "num_images": 1000.0},
            "fgovd": {"hard": 30.9},
        }
    )
    lines = table.splitlines()
    assert lines[0].split() == ["dataset", "scoring", "metrics"]
    assert "urban1k  dual-encoder" in lines[2] and "t2i_r1=88.60" in lines[2]
    assert "num_images=1000" in lines[2]
    assert "text-conditioned*" in lines[3] and "t2i_r1=91.00" in lines[3]
    assert "hard=30.90" in lines[4]
    assert "not a leak-free" in lines[-1]
    assert registry.format_table({}) == "(no evaluation results)"


def test_format_table_orders_metrics_and_wraps():
    """Retrieval R@1/5/10 by direction, box splits by difficulty, counts last (not the
    alphabetical order metrics.jsonl stores), wrapped to the width under the metrics column."""
    metrics = {"box_easy": 70.0, "i2t_r1": 20.0, "box_hard": 25.0, "num_images": 256.0}
    metrics.update({"t2i_r5": 80.0, "t2i_r1": 21.0, "box_medium": 55.0, "zeta": 1.0})
    table = registry.format_table({"synthetic": metrics}, width=60)
    body = [line for line in table.splitlines()[2:]]
    cells = " ".join(body).split()[2:]
    names = [c.split("=")[0] for c in cells]
    assert names == [
        "t2i_r1", "t2i_r5", "i2t_r1", "box_hard", "box_medium", "box_easy", "zeta", "num_images"
    ]  # fmt: skip
    assert len(body) > 1 and all(len(line) <= 60 for line in body)
    column = body[0].index("t2i_r1")
    assert all(line[:column].isspace() and line[column] != " " for line in body[1:])


def _record(image, caption, caption_negs, boxes, box_texts, negatives):
    return dict(
        image=image,
        caption=caption,
        caption_negatives=caption_negs,
        boxes=np.array(boxes, np.float32),
        box_texts=box_texts,
        negatives=negatives,
    )


def test_synthetic_scores_hand_computed():
    a = quadrant_image("red", "blue", "green", "red", 16, 16)  # mean colour ~ (2, 1, 1)
    b = quadrant_image("blue", "blue", "blue", "blue", 16, 16)
    records = [
        _record(
            a,
            "red red green blue",
            ["green green red blue"],
            [[0, 0, 8, 8], [8, 0, 8, 8]],
            ["red", "red"],
            {"hard": [["blue"], ["blue"]], "easy": [["green"], ["red"]]},  # 2nd easy: tie -> hit
        ),
        _record(
            b, "blue", ["red"], [[0, 0, 16, 16]], ["blue"], {"hard": [["green"]], "easy": [[]]}
        ),
    ]
    out = synthetic_scores(ColourFake(), records, batch_size=2, tci=True)
    for key in ("t2i_r1", "i2t_r1", "tci_t2i_r1", "tci_i2t_r1", "caption_neg_acc", "box_easy"):
        assert out[key] == pytest.approx(100.0), key
    assert out["box_hard"] == pytest.approx(200 / 3)  # the blue box called "red" loses to "blue"
    assert out["num_images"] == 2


class AttentionFake(ColourFake):
    """ColourFake with a pooler: head 0 attends uniformly to the 4x4 patches whose colour is the
    text's colour word, head 1 uniformly to all 16."""

    def attention(self, images, texts):
        grid = self.dense_features(images)  # [N, 4, 4, 3] mean colour per patch
        names = ["red", "green", "blue"]  # RGB channel order
        out = np.full((len(texts), 2, 16), 1.0 / 16, np.float32)
        for n, text in enumerate(texts):
            match = (grid[n].argmax(-1) == names.index(text.split()[0])).reshape(-1)
            out[n, 0] = match / max(match.sum(), 1)
        return out


def test_pooler_box_attention_share_hand_computed():
    """Image a: red at top left and bottom right; its two 8x8 boxes (4 of 16 patches each) are
    named "red". Head 0 puts half its mass in the top-left box and none in the top-right one;
    head 1 puts 4/16 in each. Image b's box is the whole image. Mean over heads, then boxes:
    ((50 + 25) / 2 + (0 + 25) / 2 + 100) / 3 = 50 %."""
    a = quadrant_image("red", "blue", "green", "red", 16, 16)
    b = quadrant_image("blue", "blue", "blue", "blue", 16, 16)
    records = [
        _record(a, "red", ["blue"], [[0, 0, 8, 8], [8, 0, 8, 8]], ["red", "red"], {}),
        _record(b, "blue", ["red"], [[0, 0, 16, 16]], ["blue"], {}),
    ]
    out = synthetic_scores(AttentionFake(), records, batch_size=2, tci=True)
    assert out["pooler_box_attention"] == pytest.approx(50.0)
    # Pointing game on the dense colours: "red" points at the first red patch, the top-left one
    # (ties go to the first patch): a hit for the top-left box, a miss for the top-right one;
    # "blue" on the all-blue image is a hit.
    assert out["box_pointing"] == pytest.approx(200 / 3)
    assert "pooler_box_attention" not in synthetic_scores(AttentionFake(), records, 2, tci=False)
    assert "pooler_box_attention" not in synthetic_scores(ColourFake(), records, 2, tci=True)


def test_box_patch_mask_maps_pixels_to_the_grid():
    # 4x4 grid on a 32 (high) x 64 (wide) image: patch centres at x = 8, 24, 40, 56; y = 4, 12, ...
    mask = box_patch_mask((20, 0, 30, 14), (32, 64), 4)
    assert (
        mask.tolist()
        == [[False, True, True, False], [False, True, True, False]] + [[False] * 4] * 2
    )
    tiny = box_patch_mask((30, 17, 2, 2), (32, 64), 4)  # holds no centre: the patch under it
    assert np.argwhere(tiny).tolist() == [[2, 1]]


def test_synthetic_evaluator_on_synthetic_scenes():
    pytest.importorskip("beta_clip_jax.data.synthetic")
    ev = SyntheticEvaluator("synthetic", {"kind": "synthetic", "num_examples": 5, "batch_size": 4})
    out = ev.run(ColourFake())
    for key in ("t2i_r1", "i2t_r10", "tci_t2i_r1", "caption_neg_acc", "box_hard", "box_binding"):
        assert 0.0 <= out[key] <= 100.0, key
    assert out["num_images"] == 5
    assert ev.run(ColourFake()) == out  # deterministic scenes, cached records
