"""Where does a text look? Heat maps of the pooler's attention and of patch-text similarity.

    python -m beta_clip_jax.reporting.visualize --model=PATH --image=IMG --text="a red car" \
        --out=heat.png

PATH is anything `api.load` accepts (a workdir, an exported or a Hugging Face CLIP directory). The
PNG shows the image (resized and centre-cropped to the model's input, as in evaluation), the
text-conditioned pooler's attention over patches averaged over heads, and the cosine similarity of
each projected patch feature with the text embedding, both overlaid on the image.
"""

from __future__ import annotations

import importlib
import warnings

import numpy as np
from absl import app, flags

from beta_clip_jax.evals.base import load_image, prepare_image
from beta_clip_jax.mathutil import l2_normalize


def attention_maps(encoder, image, text: str) -> tuple[np.ndarray | None, np.ndarray]:
    """(attn [h, w] or None, sim [h, w]) for one image (uint8 HWC or PIL) and one text.

    attn needs `encoder.attention(images, texts) -> [N, heads, h*w]` (the pooler's attention
    weights); an encoder without it yields None. sim is patch-text cosine similarity.
    """
    size = encoder.image_size
    batch = prepare_image(image, size, "crop")[None]
    grid = np.asarray(encoder.dense_features(batch), np.float32)[0]  # [h, w, E]
    h, w = grid.shape[:2]
    text_emb = np.asarray(encoder.embed_texts([text]), np.float32)[0]
    sim = l2_normalize(grid) @ l2_normalize(text_emb)
    attend = getattr(encoder, "attention", None)
    if attend is None:
        return None, sim
    attn = np.asarray(attend(batch, [text]), np.float32)[0]  # [heads, P]
    if attn.shape[-1] != h * w:
        raise ValueError(f"attention covers {attn.shape[-1]} patches, the grid has {h}x{w}")
    return attn.mean(axis=0).reshape(h, w), sim


def attention_panel(attn: np.ndarray):
    """(title, values, norm) of the attention panel: attention as a multiple of uniform, on a
    fixed log scale from 1x (the bottom) to the patch count, the range in the title."""
    from matplotlib.colors import LogNorm

    ratio = attn * attn.size  # 1 = uniform
    title = (
        f"pooler attention / uniform (mean over heads)\n"
        f"{ratio.min():.2f}x to {ratio.max():.2f}x; scale 1x to {attn.size}x"
    )
    norm = LogNorm(vmin=1.0, vmax=float(attn.size), clip=True)
    return title, np.maximum(ratio, 1.0), norm


def render(image: np.ndarray, text: str, attn: np.ndarray | None, sim: np.ndarray, out: str):
    """Write a PNG: the image, then each available map overlaid on it (bilinear upsampling).

    Attention is drawn as a multiple of uniform attention on a fixed log scale from 1 (uniform,
    the scale's bottom: near-uniform attention looks flat, not focused) to the patch count (all
    of it on one patch). Similarity keeps its own range; both panels print their value range."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("image", None, None)]
    if attn is not None:
        panels.append(attention_panel(attn))
    panels.append((f"patch-text cosine similarity\n{sim.min():.3f} to {sim.max():.3f}", sim, None))
    size = image.shape[0]
    edges = (-0.5, size - 0.5, size - 0.5, -0.5)  # the image's own pixel-edge extent
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 4.6), squeeze=False)
    for ax, (title, heat, norm) in zip(axes[0], panels, strict=True):
        ax.imshow(image)
        if heat is not None:
            shown = ax.imshow(
                heat, cmap="jet", alpha=0.5, interpolation="bilinear", extent=edges, norm=norm
            )
            fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.04)
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    fig.suptitle(text if len(text) <= 90 else text[:87] + "...", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def visualize(encoder, image, text: str, out: str) -> tuple[np.ndarray | None, np.ndarray]:
    """Compute the maps for (image, text) and write them to `out`; returns the maps."""
    attn, sim = attention_maps(encoder, image, text)
    if attn is None:
        warnings.warn(
            "the encoder exposes no pooler attention (Encoder.attention); drawing similarity only",
            stacklevel=2,
        )
    render(prepare_image(image, encoder.image_size, "crop"), text, attn, sim, out)
    return attn, sim


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """The command's flags; defined only when it runs (cli.run_command, or as __main__)."""
    flags.DEFINE_string(
        "model", None, "workdir, exported or HF CLIP directory", flag_values=flag_values
    )
    flags.DEFINE_string("image", None, "image file", flag_values=flag_values)
    flags.DEFINE_string("text", None, "the text whose attention to show", flag_values=flag_values)
    flags.DEFINE_string("out", "heat.png", "output PNG path", flag_values=flag_values)
    flags.mark_flags_as_required(["model", "image", "text"], flag_values=flag_values)


def main(argv, flag_values: flags.FlagValues = flags.FLAGS) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    f = flag_values
    # Looked up in sys.modules when the command runs (heavy: converters, JAX), so a caller may
    # substitute the API (tests do); a downward import all the same (reporting -> api).
    api = importlib.import_module("beta_clip_jax.api")
    encoder = api.load(f.model)
    visualize(encoder, load_image(f.image), f.text, f.out)
    print(f"wrote {f.out}")


if __name__ == "__main__":
    define_flags()
    app.run(main)
