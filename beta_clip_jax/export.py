"""python -m beta_clip_jax.export --workdir=DIR --out=OUT [--step=N] [--format=hf,open_clip]
    [--text_encoder_only [--sdxl_text_encoder_2]]

The export command; what it writes, and the functions that write it (export_params,
export_workdir), are beta_clip_jax/convert/export.py (docs/export.md).
"""

import logging

from beta_clip_jax.convert.export import check_formats, export_workdir


def _define_flags() -> None:
    """Flags are defined only when run as a program: other CLIs share the names in one process."""
    from absl import flags

    flags.DEFINE_string("workdir", None, "Training workdir (with checkpoints/ and config.json).")
    flags.DEFINE_string("out", None, "Output directory (new, empty or an earlier export).")
    flags.DEFINE_integer("step", None, "Checkpoint step to export (default: the latest).")
    flags.DEFINE_list(
        "format",
        ["hf"],
        "Comma-separated layouts: hf (transformers CLIPModel + pooler), open_clip, "
        "text_encoder (diffusers text_encoder/ + tokenizer/), sdxl_text_encoder_2.",
    )
    flags.DEFINE_bool(
        "text_encoder_only",
        False,
        "Write only a diffusers text_encoder/ + tokenizer/ pair (CLIPTextModel, the model's "
        "context length), as --format=text_encoder.",
    )
    flags.DEFINE_bool(
        "sdxl_text_encoder_2",
        False,
        "With --text_encoder_only: SDXL's second slot, text_encoder_2/ + tokenizer_2/ "
        "(CLIPTextModelWithProjection).",
    )
    flags.mark_flags_as_required(["workdir", "out"])


def formats_from_flags(flag_values) -> tuple[str, ...]:
    """--format, or the one text-encoder format --text_encoder_only asks for."""
    from absl import app

    if flag_values.sdxl_text_encoder_2 and not flag_values.text_encoder_only:
        raise app.UsageError("--sdxl_text_encoder_2 needs --text_encoder_only")
    if not flag_values.text_encoder_only:
        try:
            return check_formats(flag_values.format)
        except ValueError as e:
            raise app.UsageError(f"--format: {e}") from None
    if flag_values["format"].present:
        raise app.UsageError("--text_encoder_only writes one layout: leave out --format")
    return ("sdxl_text_encoder_2",) if flag_values.sdxl_text_encoder_2 else ("text_encoder",)


def main(argv) -> None:
    from absl import app, flags

    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.getLogger().setLevel(logging.INFO)
    f = flags.FLAGS
    formats = formats_from_flags(f)
    out = export_workdir(f.workdir, f.out, f.step, formats=formats)
    print(f"exported {f.workdir} to {out} ({', '.join(formats)})")


if __name__ == "__main__":
    from absl import app

    _define_flags()
    app.run(main)
