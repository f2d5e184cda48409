"""Bad weight files: every loader refuses them with a message naming the file (and the tensor,
where there is one), and nothing from a file is executed.

Safetensors with a NaN / infinity, a non-float dtype (int64, bool, float8, ...), or cut short
in its data or its header; torch files (zip and legacy pickles, plain, TorchScript, official
β-CLIP and HF `pytorch_model.bin`) with the same values, and pickle streams that name code
(os.system, builtins.eval / exec, marshal.loads of a code object, ...) through every opcode that
can call something. A payload would create a marker file; it must not exist afterwards.
test_convert.py and test_convert_bclip.py cover the plain os.system pickle and shape errors.
"""

import json
import marshal
import os
import pickle
import re
import warnings
import zipfile

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file
from safetensors.torch import save_file as save_torch_file

from beta_clip_jax.convert import import_pretrained
from beta_clip_jax.convert.hf import read_safetensors
from beta_clip_jax.convert.openai import read_openai_state_dict

WEIGHT = "vision_model.encoder.layers.0.mlp.fc1.weight"
POOL = "text_conditioned_patches_block."


def hf_dir(tmp_path, tensors, name="model.safetensors", torch_tensors=False) -> str:
    """A HF-style directory: an empty config.json (the weights are read first) and `tensors`."""
    path = tmp_path / "hf"
    path.mkdir(exist_ok=True)
    (path / "config.json").write_text("{}")
    (save_torch_file if torch_tensors else save_file)(tensors, str(path / name))
    return str(path)


def refused(spec, *patterns, error=ValueError):
    """The error `import_pretrained(spec)` raises; each pattern must occur in its message."""
    with pytest.raises(error) as info:
        import_pretrained(spec)
    message = str(info.value)
    for pattern in patterns:
        assert re.search(pattern, message), (pattern, message)
    return message


def good(n=6):
    return np.arange(n, dtype=np.float32).reshape(2, -1)


@pytest.mark.parametrize(
    "value, counts",
    [
        (np.array([1.0, np.nan, 2.0], np.float32), "1 NaN and 0 infinite"),
        (np.array([np.inf, -np.inf, 2.0], np.float32), "0 NaN and 2 infinite"),
        (np.array([np.inf, np.nan], np.float16), "1 NaN and 1 infinite"),
        (np.array([[np.nan]], np.float64), "1 NaN and 0 infinite"),
    ],
)
def test_safetensors_nan_or_inf_is_refused_by_file_and_tensor(tmp_path, value, counts):
    path = hf_dir(tmp_path, {"text_projection.weight": good(), WEIGHT: value})
    refused("hf:" + path, re.escape(os.path.join(path, "model.safetensors")), WEIGHT, counts)


def test_bfloat16_nan_is_refused_after_widening(tmp_path):
    tensors = {WEIGHT: torch.tensor([1.0, float("nan")], dtype=torch.bfloat16)}
    path = hf_dir(tmp_path, tensors, torch_tensors=True)
    refused("hf:" + path, "model.safetensors", WEIGHT, "1 NaN")


@pytest.mark.parametrize(
    "tensor, dtype",
    [
        (np.arange(4, dtype=np.int64), "I64"),
        (np.array([True, False]), "BOOL"),
        (np.arange(4, dtype=np.int32), "I32"),
        (np.arange(4, dtype=np.uint8), "U8"),
        (torch.ones(4).to(torch.float8_e4m3fn), "F8_E4M3"),
        (torch.ones(4).to(torch.float8_e5m2), "F8_E5M2"),
    ],
)
def test_safetensors_non_float_dtype_is_refused_by_file_and_tensor(tmp_path, tensor, dtype):
    as_torch = isinstance(tensor, torch.Tensor)
    tensors = {"text_projection.weight": torch.ones(2) if as_torch else good(), WEIGHT: tensor}
    path = hf_dir(tmp_path, tensors, torch_tensors=as_torch)
    refused("hf:" + path, "model.safetensors", WEIGHT, f"dtype {dtype}", "floating point")


def test_integer_position_ids_and_float_weights_still_load(tmp_path):
    """The HF buffer position_ids is an integer tensor by nature: not refused."""
    path = tmp_path / "ok.safetensors"
    ids = np.arange(7, dtype=np.int64)[None]
    save_file({"text_model.embeddings.position_ids": ids, WEIGHT: good()}, str(path))
    out = read_safetensors(str(path))
    np.testing.assert_array_equal(out["text_model.embeddings.position_ids"], ids)
    np.testing.assert_array_equal(out[WEIGHT], good())


def _cut(path: str, size: int) -> None:
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[:size])


def test_truncated_safetensors_name_file_and_the_cut_tensor(tmp_path):
    tensors = {"a.weight": good(), "b.weight": np.ones((64, 64), np.float32)}
    path = hf_dir(tmp_path, tensors)
    file = os.path.join(path, "model.safetensors")
    with open(file, "rb") as f:
        header = 8 + int.from_bytes(f.read(8), "little")
    full = os.path.getsize(file)
    # a.weight (24 bytes) comes first in the data; the cut lands in b.weight's bytes.
    _cut(file, header + 24 + (full - header - 24) // 2)
    refused("hf:" + path, re.escape(file), "file cut short: tensor 'b.weight'")
    _cut(file, header // 2)  # in the middle of the header
    refused("hf:" + path, re.escape(file), "header cut short")
    _cut(file, 5)  # not even the header's length
    refused("hf:" + path, re.escape(file), "header cut short")
    with open(file, "wb") as f:  # a length that fits, then no JSON
        f.write((16).to_bytes(8, "little") + b"\xff" * 16)
    refused("hf:" + path, re.escape(file), "safetensors")


def test_sharded_index_may_not_leave_the_directory(tmp_path):
    path = hf_dir(tmp_path, {WEIGHT: good()}, name="model-1.safetensors")
    save_file({WEIGHT: good()}, str(tmp_path / "outside.safetensors"))
    index = os.path.join(path, "model.safetensors.index.json")
    with open(index, "w") as f:
        json.dump({"weight_map": {WEIGHT: "../outside.safetensors"}}, f)
    refused("hf:" + path, "model.safetensors.index.json", "not a file name in")
    with open(index, "w") as f:
        json.dump({"weight_map": {WEIGHT: "model-2.safetensors"}}, f)
    refused("hf:" + path, "model-2.safetensors", "not in", error=FileNotFoundError)


def test_pooler_file_values_are_checked(tmp_path):
    path = str(tmp_path / "beta_clip_pooler.safetensors")
    save_file({"pooler/query/kernel": np.array([np.nan], np.float32)}, path)
    with pytest.raises(ValueError, match=r"beta_clip_pooler\.safetensors: tensor 'pooler/query"):
        read_safetensors(path)


def _torch_save(path, obj, legacy=False):
    torch.save(obj, path, _use_new_zipfile_serialization=not legacy)
    return str(path)


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_torch_files_with_nan_or_integer_weights_are_refused(tmp_path, legacy):
    nan = {"visual.proj": torch.tensor([[1.0, float("nan")]]), "logit_scale": torch.tensor(1.0)}
    path = _torch_save(tmp_path / "nan.pt", nan, legacy)
    refused("openai:" + path, re.escape(path), "tensor 'visual.proj'", "1 NaN")
    ints = {"visual.proj": torch.ones(2, 2, dtype=torch.int64)}
    path = _torch_save(tmp_path / "int.pt", ints, legacy)
    refused("openai:" + path, re.escape(path), "tensor 'visual.proj'", "dtype int64")
    flags = {"module.visual.proj": torch.ones(2, dtype=torch.bool)}
    path = _torch_save(tmp_path / "bool.pt", {"state_dict": flags}, legacy)
    refused("openai:" + path, re.escape(path), "tensor 'visual.proj'", "dtype bool")
    official = {"state_dict": {"module." + POOL + "logit_scale": torch.tensor(float("inf"))}}
    path = _torch_save(tmp_path / "bclip.pt", official, legacy)
    refused("bclip:" + path, re.escape(path), f"tensor '{POOL}logit_scale'", "1 infinite")


def test_float8_in_torch_files_is_refused(tmp_path):
    f8 = {"visual.proj": torch.ones(2).to(torch.float8_e4m3fn)}
    # An HF pytorch_model.bin goes through torch.load, which rebuilds float8: refused by name.
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    _torch_save(tmp_path / "hf" / "pytorch_model.bin", f8)
    refused("hf:" + str(tmp_path / "hf"), "pytorch_model.bin", "'visual.proj'", "float8_e4m3fn")
    # The zip format rebuilds float8 with a function only newer dtypes need: refused unread.
    path = _torch_save(tmp_path / "f8.pt", f8)
    refused(
        "openai:" + path, re.escape(path), r"refusing to load torch\._utils\._rebuild_tensor_v3",
        "float32", error=pickle.UnpicklingError,
    )  # fmt: skip


def test_torchscript_values_are_checked_but_attn_mask_may_be_infinite(tmp_path):
    class Holder(torch.nn.Module):
        def __init__(self, scale):
            super().__init__()
            self.register_buffer("logit_scale", torch.tensor(scale))
            self.register_buffer("attn_mask", torch.full((2, 2), float("-inf")).triu(1))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.script(Holder(2.0)).save(str(tmp_path / "ok.pt"))
        torch.jit.script(Holder(float("nan"))).save(str(tmp_path / "nan.pt"))
    ok = read_openai_state_dict(str(tmp_path / "ok.pt"))
    assert np.isneginf(ok["attn_mask"][0, 1]) and ok["logit_scale"] == 2.0
    with pytest.raises(ValueError, match=r"nan\.pt: tensor 'logit_scale' \(\) holds 1 NaN"):
        read_openai_state_dict(str(tmp_path / "nan.pt"))


def test_hf_pytorch_model_bin_values_are_checked(tmp_path):
    path = tmp_path / "hf"
    path.mkdir()
    (path / "config.json").write_text("{}")
    torch.save({WEIGHT: torch.tensor([float("nan")])}, path / "pytorch_model.bin")
    refused("hf:" + str(path), "pytorch_model.bin", WEIGHT, "1 NaN")


# --- pickle streams that name code -------------------------------------------------------------


def _code_payload(marker) -> bytes:
    """types.FunctionType(marshal.loads(<code that creates the marker>), {})(): protocol 3
    opcodes GLOBAL, GLOBAL, BINBYTES, TUPLE1, REDUCE, EMPTY_DICT, TUPLE2, REDUCE, EMPTY_TUPLE,
    REDUCE."""
    code = marshal.dumps(compile(f"open({str(marker)!r}, 'w').close()", "payload", "exec"))
    binbytes = b"B" + len(code).to_bytes(4, "little") + code
    return b"\x80\x03ctypes\nFunctionType\ncmarshal\nloads\n" + binbytes + b"\x85R}\x86R)R."


def payloads(marker) -> dict[str, tuple[bytes, str]]:
    """name -> (data.pkl bytes, the name or reason the refusal must mention)."""
    touch = f"open({str(marker)!r}, 'w').close()"
    shell = f"touch {marker}"

    class System:
        def __reduce__(self):
            return os.system, (shell,)

    return {
        "global_reduce_eval": (f"cbuiltins\neval\n(S{touch!r}\ntR.".encode(), "builtins.eval"),
        "global_reduce_exec": (f"cbuiltins\nexec\n(S{touch!r}\ntR.".encode(), "builtins.exec"),
        "code_object": (_code_payload(marker), "types.FunctionType"),
        "marshal_loads": (b"\x80\x03cmarshal\nloads\nC\x00\x85R.", "marshal.loads"),
        "stack_global_system": (pickle.dumps(System(), protocol=4), "system"),
        "inst_system": (f"(S{shell!r}\nios\nsystem\n.".encode(), "os.system"),
        "obj_system": (f"(cos\nsystem\nS{shell!r}\no.".encode(), "os.system"),
        "getattr_import": (
            b"cbuiltins\ngetattr\n(cbuiltins\n__import__\n(S'os'\ntRS'system'\ntR.",
            "builtins.getattr",
        ),  # fmt: skip
        "reduce_on_storage_name": (b"ctorch\nFloatStorage\n(S'x'\ntR.", "not callable"),
        "rebuild_without_storage": (
            b"ctorch._utils\n_rebuild_tensor_v2\n(S'x'\nI0\n(tI0\ntR.",
            "not a storage",
        ),
        "record_with_arguments": (b"c__torch__\nEvil\n(S'x'\ntR.", "TypeError"),
        "bad_persistent_id": (b"(S'no'\ntQ.", "unknown persistent id"),
        "extension_code": (b"\x80\x02\x82\x01.", "extension"),
        "cut_short": (pickle.dumps({"a": [1, 2, 3]}, protocol=2)[:-4], "truncated"),
    }


def _zip_pt(path, data_pkl: bytes) -> str:
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("evil/data.pkl", data_pkl)
        z.writestr("evil/version", "3\n")
    return str(path)


PAYLOAD_NAMES = list(payloads("m"))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")
@pytest.mark.parametrize("name", PAYLOAD_NAMES)
def test_pickle_payloads_are_refused_unrun_by_every_loader(tmp_path, name):
    marker = tmp_path / "ran"
    data, mentioned = payloads(marker)[name]
    path = _zip_pt(tmp_path / "evil.pt", data)
    for spec in ("openai:" + path, "bclip:" + path, path):
        message = refused(spec, re.escape(path), error=pickle.UnpicklingError)
        assert mentioned in message, (spec, message)
    # The same stream as a legacy (non-zip) file and as an HF pytorch_model.bin goes through
    # torch.load(weights_only=True): refused too, naming the file, and without torch's advice
    # to retry with weights_only=False.
    legacy = tmp_path / "legacy.pt"
    legacy.write_bytes(data)
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    (hf / "pytorch_model.bin").write_bytes(data)
    for spec, file in (
        ("openai:" + str(legacy), legacy),
        ("hf:" + str(hf), hf / "pytorch_model.bin"),
    ):
        with pytest.raises((pickle.UnpicklingError, ValueError)) as info:
            import_pretrained(spec)
        assert str(file) in str(info.value) and "likely succeed" not in str(info.value)
    assert not marker.exists()
    assert not os.path.exists(f"touch {marker}")


@pytest.mark.parametrize("name", ["global_reduce_eval", "global_reduce_exec", "code_object"])
def test_payloads_would_run_if_unpickled_plainly(tmp_path, name):
    """The payloads are live: a plain unpickler runs them (so the test above would catch a
    reader that let one through)."""
    marker = tmp_path / "ran"
    pickle.loads(payloads(marker)[name][0])
    assert marker.exists()
