"""β-CLIP ViT-B/16, BCE variant (the paper's Urban1K row): configs/b16_urban.py with mode "bce".

    python -m beta_clip_jax.main --config=configs/b16_urban_bce.py --workdir=runs/b16_bce \
        --config.init=openai:/path/to/ViT-B-16.pt ...   (the same paths as configs/b16_urban.py)
"""

import importlib.util
import os

_spec = importlib.util.spec_from_file_location(
    "b16_urban", os.path.join(os.path.dirname(os.path.abspath(__file__)), "b16_urban.py")
)
_base = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_base)


def get_config(arg: str = "bce"):
    return _base.get_config(arg or "bce")
