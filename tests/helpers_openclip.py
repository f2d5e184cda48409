"""open_clip in the tests, beside the CPU torch build the project pins.

PyPI's torchvision wheels do not load beside that torch ("operator torchvision::nms does not
exist"), and transformers breaks wherever torchvision is installed, so the test environment has
open_clip_torch without torchvision (`pip install --no-deps open_clip_torch`); open_clip is then
imported over inert stand-ins for the torchvision names it imports at module level (its image
transforms, which the tests never call: they feed pixels they normalised themselves).
"""

import importlib.machinery
import sys
import types
from unittest import mock

import pytest


def torchvision_stand_ins() -> dict[str, types.ModuleType]:
    """Inert modules for the torchvision names open_clip imports at module level (its image
    transforms, FrozenBatchNorm2d); these tests call none of them."""
    names = ["torchvision", "torchvision.transforms", "torchvision.transforms.functional",
             "torchvision.ops", "torchvision.ops.misc"]  # fmt: skip
    mods = {}
    for name in names:
        mods[name] = types.ModuleType(name)
        mods[name].__spec__ = importlib.machinery.ModuleSpec(name, None)  # for find_spec callers
        mods[name].__getattr__ = lambda attr, name=name: mock.MagicMock(name=f"{name}.{attr}")
    for name in names[1:]:
        parent, _, leaf = name.rpartition(".")
        setattr(mods[parent], leaf, mods[name])
    return mods


def import_open_clip():
    """open_clip itself. PyPI's torchvision does not load beside the CPU torch build this project
    pins ("operator torchvision::nms does not exist"), so where it cannot be imported, open_clip
    is imported over stand-ins for it, and without timm (optional to open_clip, and it needs
    torchvision too); sys.modules is then restored, so no other test sees them."""
    import importlib.util

    if importlib.util.find_spec("open_clip") is None:
        pytest.skip("open_clip_torch is not installed")
    try:
        import torchvision  # noqa: F401
    except Exception:
        pass
    else:
        import open_clip

        return open_clip
    stand_ins = torchvision_stand_ins()
    saved = {name: sys.modules.get(name) for name in [*stand_ins, "timm"]}
    sys.modules.update(stand_ins)
    sys.modules["timm"] = None  # `import timm` raises ImportError: open_clip goes without
    try:
        import open_clip
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
    return open_clip
