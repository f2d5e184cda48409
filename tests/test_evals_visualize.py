"""visualize: attention / similarity maps from a fake encoder, PNG output, the command line."""

import types

import numpy as np
import pytest
from PIL import Image
from test_evals_fakes import ColourFake, quadrant_image

from beta_clip_jax.cli import run_command
from beta_clip_jax.reporting import visualize


class AttendingFake(ColourFake):
    """ColourFake plus pooler attention: 2 heads, one uniform, one on the text's colour cells."""

    def attention(self, images, texts):
        grid = self.dense_features(images)  # [N, 4, 4, 3]
        text = self.embed_texts(texts)  # [N, 3]
        focus = np.einsum("nhwc,nc->nhw", grid, text).reshape(len(texts), -1)
        focus = focus / focus.sum(axis=1, keepdims=True)
        uniform = np.full_like(focus, 1.0 / focus.shape[1])
        return np.stack([uniform, focus], axis=1)


def test_attention_maps_known_values():
    image = quadrant_image("red", "blue", "green", "red", 16, 16)
    attn, sim = visualize.attention_maps(AttendingFake(), image, "red")
    assert attn.shape == sim.shape == (4, 4)
    np.testing.assert_allclose(sim[0, 0], 1.0, atol=1e-6)  # top-left cells are red
    np.testing.assert_allclose(sim[0, 3], 0.0, atol=1e-6)  # top-right blue
    np.testing.assert_allclose(attn.sum(), 1.0, atol=1e-6)
    # Red covers 8 of 16 cells: half the mass of the focused head lands there, plus uniform.
    np.testing.assert_allclose(attn[0, 0], 0.5 * (1 / 16 + 1 / 8), atol=1e-6)
    np.testing.assert_allclose(attn[0, 3], 0.5 * (1 / 16), atol=1e-6)
    none, _ = visualize.attention_maps(ColourFake(), image, "red")
    assert none is None


def test_writes_png_and_command_line(tmp_path, monkeypatch):
    image_path = tmp_path / "img.png"
    Image.fromarray(quadrant_image("red", "blue", "green", "red", 40, 30)).save(image_path)
    fake_api = types.ModuleType("beta_clip_jax.api")
    fake_api.load = lambda path: AttendingFake()
    monkeypatch.setitem(__import__("sys").modules, "beta_clip_jax.api", fake_api)
    out = tmp_path / "heat.png"
    args = ["--model=unused", f"--image={image_path}", "--text=a red one", f"--out={out}"]
    run_command(visualize, args)
    with Image.open(out) as png:
        assert png.format == "PNG" and png.size[0] > png.size[1] > 100
    with pytest.warns(UserWarning, match="no pooler attention"):
        visualize.visualize(ColourFake(), np.asarray(Image.open(image_path)), "red", str(out))


def test_attention_panel_has_a_fixed_scale():
    """Uniform attention sits at the scale's bottom (it must not look focused); the scale does
    not follow the data, and the title prints the range."""
    uniform = np.full((4, 4), 1 / 16)
    title, values, norm = visualize.attention_panel(uniform)
    assert (norm.vmin, norm.vmax) == (1.0, 16.0) and np.allclose(values, norm.vmin)
    assert "1.00x to 1.00x" in title
    focused = np.zeros((4, 4))
    focused[0, 0] = 1.0
    title, values, norm = visualize.attention_panel(focused)
    assert (norm.vmin, norm.vmax) == (1.0, 16.0) and values.max() == 16.0
    assert "0.00x to 16.00x" in title


def test_own_data_runs_draw_their_own_image(tmp_path):
    """A run without synthetic evaluation draws the first image and caption of its own
    evaluation set (here a held-out JSONL), not a synthetic scene."""
    from test_data_sources import caption_for, make_jsonl

    from beta_clip_jax.data import sources
    from beta_clip_jax.reporting import plots

    path, entries = make_jsonl(str(tmp_path), n=4)
    config = {
        "data": {"name": "jsonl", "path": path},
        "model": {"image_size": 32},
        "evals": {"own": {"kind": "jsonl", "path": path}},
    }
    image, text = plots.heatmap_example(str(tmp_path), config)
    first = sources.load_image(str(tmp_path / entries[0][0]))
    np.testing.assert_array_equal(image, first)
    assert text == caption_for(0).split(". ")[0]
