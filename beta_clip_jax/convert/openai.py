"""OpenAI CLIP `.pt` checkpoints: read them without running code, rename keys to the HF layout.

Two file kinds exist:
- a plain state_dict saved with torch.save: read with `torch.load(weights_only=True)`;
- OpenAI's released TorchScript archives (ViT-B-16.pt, ...): `torch.load` would dispatch them to
  `torch.jit.load`, which loads the archive's code. We read them as the zip they are instead: the
  module tree is a pickle whose classes we never import (a whitelisting unpickler maps every
  class to an inert record and tensors to numpy views of the archive's storage files).

Then the OpenAI names are rewritten to HF CLIPModel names, so the one table in names.py does the
rest. Attention heads are not stored in OpenAI checkpoints; OpenAI models use 64-wide heads.
"""

import pickle
import re
import zipfile

import numpy as np

from beta_clip_jax.models.variants import match_variant, resolve_model_config

_STORAGE_DTYPES = {
    "HalfStorage": np.float16,
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "BFloat16Storage": "bfloat16",
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}
# Attributes of the OpenAI module that are not weights.
_NON_WEIGHTS = re.compile(r"(^|\.)(input_resolution|context_length|vocab_size|attn_mask)$")


class _Record:
    """Inert stand-in for a pickled TorchScript module: keeps its attribute dict, nothing else."""

    state: dict = {}  # replaced per object by __setstate__ (NEWOBJ skips __init__)

    def __setstate__(self, state):
        self.state = state if isinstance(state, dict) else {"_": state}


def _storage_type(name: str):
    return ("storage_type", name)


def _rebuild_tensor(storage, offset, size, stride, *_):
    """A numpy view shaped like the tensor (strides in elements, as torch stores them)."""
    if not size:
        return np.array(storage[offset])
    item = storage.itemsize
    return np.lib.stride_tricks.as_strided(
        storage[offset:], shape=tuple(size), strides=tuple(s * item for s in stride)
    ).copy()


def _rebuild_parameter(data, *_):
    return data


class _SafeUnpickler(pickle.Unpickler):
    """Resolves only tensor rebuild helpers, storage types and OrderedDict; every TorchScript
    class becomes a _Record. Anything else is refused, so no code from the file can run."""

    def __init__(self, data: bytes, archive: zipfile.ZipFile, prefix: str):
        import io

        super().__init__(io.BytesIO(data))
        self._archive, self._prefix, self._storages = archive, prefix, {}

    def find_class(self, module, name):
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _rebuild_tensor
        if module == "torch._utils" and name == "_rebuild_parameter":
            return _rebuild_parameter
        if module == "torch" and name in _STORAGE_DTYPES:
            return _storage_type(name)
        if module == "collections" and name == "OrderedDict":
            import collections

            return collections.OrderedDict
        if module.startswith("__torch__"):
            return _Record
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a checkpoint")

    def persistent_load(self, pid):
        _, stype, key, _location, _numel = pid
        if key not in self._storages:
            raw = self._archive.read(f"{self._prefix}/data/{key}")
            dtype = _STORAGE_DTYPES[stype[1]]
            if dtype == "bfloat16":  # numpy has no bf16: widen the 16 bits into float32
                arr = (np.frombuffer(raw, np.uint16).astype(np.uint32) << 16).view(np.float32)
            else:
                arr = np.frombuffer(raw, dtype)
            self._storages[key] = arr
        return self._storages[key]


def _is_torchscript(path: str) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.endswith("/constants.pkl") or "/code/" in n for n in z.namelist())


def _read_torchscript(path: str) -> dict[str, np.ndarray]:
    """Dotted name -> array for every tensor attribute in a TorchScript archive's module tree."""
    with zipfile.ZipFile(path) as z:
        pkl = [n for n in z.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
        if not pkl:
            raise ValueError(f"{path}: TorchScript archive without a top-level data.pkl")
        prefix = pkl[0].split("/")[0]
        root = _SafeUnpickler(z.read(pkl[0]), z, prefix).load()
    out: dict[str, np.ndarray] = {}

    def walk(obj, name):
        if isinstance(obj, np.ndarray):
            out[name] = obj
        elif isinstance(obj, _Record):
            for k, v in obj.state.items():
                walk(v, f"{name}.{k}" if name else k)

    walk(root, "")
    return out


def read_openai_state_dict(path: str) -> dict[str, np.ndarray]:
    """OpenAI-named tensors of a `.pt` file (TorchScript archive or plain state_dict)."""
    import os

    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"expected an OpenAI CLIP checkpoint (.pt, e.g. ViT-B-16.pt) at {path}"
        )
    if _is_torchscript(path):
        return _read_torchscript(path)
    import torch

    sd = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise ValueError(f"{path} holds a {type(sd).__name__}, not a state_dict")
    return {k.removeprefix("module."): v.float().numpy() for k, v in sd.items()}


_BLOCK_RENAMES = {
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}
_TOP_RENAMES = {
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
    "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
    "logit_scale": "logit_scale",
}
_BLOCK_KEY = re.compile(r"^(visual\.)?transformer\.resblocks\.(\d+)\.(.+)$")


def openai_to_hf_state_dict(sd: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """OpenAI CLIP names -> HF CLIPModel names (float32). Unknown keys pass through unchanged,
    so the shape check reports them by their own name."""
    out = {}
    for key, value in sd.items():
        if _NON_WEIGHTS.search(key):
            continue
        value = np.asarray(value, dtype=np.float32)
        m = _BLOCK_KEY.match(key)
        if key in _TOP_RENAMES:
            out[_TOP_RENAMES[key]] = value
        elif key == "visual.proj":  # stored (in, out): a torch Linear weight is its transpose
            out["visual_projection.weight"] = value.T
        elif key == "text_projection":
            out["text_projection.weight"] = value.T
        elif m:
            tower = "vision_model" if m.group(1) else "text_model"
            prefix = f"{tower}.encoder.layers.{m.group(2)}"
            rest = m.group(3)
            if rest.startswith("attn.in_proj_"):  # fused [3D, ...] -> q, k, v
                kind = rest.removeprefix("attn.in_proj_")
                for name, part in zip(
                    ("q_proj", "k_proj", "v_proj"), np.split(value, 3), strict=True
                ):
                    out[f"{prefix}.self_attn.{name}.{kind}"] = part
                continue
            for ours, theirs in _BLOCK_RENAMES.items():
                if rest.startswith(ours + "."):
                    rest = theirs + rest[len(ours) :]
                    break
            out[f"{prefix}.{rest}"] = value
        else:
            out[key] = value
    return out


def variant_from_openai_state_dict(sd: dict[str, np.ndarray], heads=None):
    """Our resolved model config from OpenAI tensor shapes (OpenAI-named keys).

    `heads` = (vision_heads, text_heads) to use when known; otherwise width // 64.
    """
    try:
        conv = sd["visual.conv1.weight"].shape
        vpos = sd["visual.positional_embedding"].shape
        text_w = sd["ln_final.weight"].shape[0]
        vision_w = conv[0]
        shapes = dict(
            patch_size=conv[-1],
            image_size=conv[-1] * round((vpos[0] - 1) ** 0.5),
            vision_width=vision_w,
            vision_layers=_count_layers(sd, "visual.transformer.resblocks."),
            text_width=text_w,
            text_layers=_count_layers(sd, "transformer.resblocks."),
            vocab_size=sd["token_embedding.weight"].shape[0],
            context_length=sd["positional_embedding"].shape[0],
            embed_dim=sd["text_projection"].shape[1],
        )
    except KeyError as e:
        raise ValueError(f"not an OpenAI CLIP state_dict: tensor {e} is missing") from None
    vh, th = heads if heads else (max(vision_w // 64, 1), max(text_w // 64, 1))
    shapes.update(vision_heads=vh, text_heads=th)
    name = match_variant(shapes)
    if name is None:
        shapes["pooler_heads"] = 8 if shapes["embed_dim"] % 8 == 0 else 1
    return resolve_model_config({"variant": name or "custom", **shapes})


def _count_layers(sd, prefix: str) -> int:
    ids = {int(k[len(prefix) :].split(".")[0]) for k in sd if k.startswith(prefix)}
    return max(ids) + 1 if ids else 0
