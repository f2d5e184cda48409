"""Torch zip checkpoints read without torch and without running code from the file.

`torch.save` (since torch 1.6) and TorchScript both write a zip: `<root>/data.pkl`, a pickle of the
saved object, and `<root>/data/<key>`, one raw file per tensor storage. A pickle names the functions
and classes that rebuild it, and a plain unpickler imports and calls whatever it names; that is how
a crafted checkpoint runs code. `RestrictedUnpickler` resolves a fixed set of names, each to
something that only stores data:

- `torch._utils._rebuild_tensor_v2` / `_rebuild_parameter`: a `TensorRef` (storage key, dtype,
  offset, shape, strides); the bytes are read only when asked for, so a caller can skip the
  optimizer state of a training checkpoint;
- `torch.<Type>Storage`: the storage's dtype (bfloat16 is widened to float32: numpy has none);
- `collections.OrderedDict` and `argparse.Namespace` (containers of plain values);
- TorchScript module classes (`__torch__.*`): a `Record` holding the object's attribute dict and
  the class's qualified name (`module_classes` lists them: the OpenAI importer reads the
  activation's class off them).

Any other name is refused with an UnpicklingError naming it and the file, before anything is
called; so is a stream that calls an allowed name with arguments it does not take.
"""

import argparse
import collections
import dataclasses
import functools
import io
import pickle
import zipfile
import zlib

import numpy as np

STORAGE_DTYPES = {
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


class Record:
    """Inert stand-in for a pickled TorchScript module: keeps its attribute dict, nothing else.
    Each pickled class gets its own subclass, whose `torch_class` is the class's qualified name."""

    state: dict = {}  # replaced per object by __setstate__ (NEWOBJ skips __init__)
    torch_class: str = ""

    def __setstate__(self, state):
        self.state = state if isinstance(state, dict) else {"_": state}


@dataclasses.dataclass(frozen=True)
class _StorageRef:
    key: str
    dtype: str


@dataclasses.dataclass(frozen=True)
class TensorRef:
    """A tensor not read yet: its storage file, element type and strided view (in elements)."""

    storage: str
    dtype: str
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]


def _rebuild_tensor(storage, offset, size, stride, *_):
    if not isinstance(storage, _StorageRef):
        raise pickle.UnpicklingError("tensor rebuilt from something that is not a storage")
    shape, strides = tuple(int(n) for n in size), tuple(int(s) for s in stride)
    return TensorRef(storage.key, storage.dtype, int(offset), shape, strides)


def _rebuild_parameter(data, *_):
    return data


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickles a torch zip's data.pkl with the whitelist in the module docstring.

    What find_class hands out is private to this unpickler (partials, subclasses): a pickle can
    set attributes on any object it names (BUILD), and must not reach module-level objects
    that other loads, or argparse, use.
    """

    def __init__(self, file):
        super().__init__(file)
        self._names = {
            ("torch._utils", "_rebuild_tensor_v2"): functools.partial(_rebuild_tensor),
            ("torch._utils", "_rebuild_parameter"): functools.partial(_rebuild_parameter),
            ("collections", "OrderedDict"): collections.OrderedDict,  # immutable builtin type
            ("argparse", "Namespace"): type("Namespace", (argparse.Namespace,), {}),
        }
        self._record = type("Record", (Record,), {})
        self._classes: dict[str, type] = {}

    def find_class(self, module, name):
        if (module, name) in self._names:
            return self._names[module, name]
        if module == "torch" and name in STORAGE_DTYPES:
            return name
        if module.startswith("__torch__"):
            qualname = f"{module}.{name}"
            if qualname not in self._classes:
                self._classes[qualname] = type("Record", (self._record,), {"torch_class": qualname})
            return self._classes[qualname]
        hint = ""
        if module.startswith("torch"):  # e.g. _rebuild_tensor_v3, which float8 tensors need
            hint = " (tensors other than float16, bfloat16, float32 and float64 ones are refused)"
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a checkpoint{hint}")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unknown persistent id {pid!r} in a checkpoint")
        stype, key = pid[1], pid[2]
        if stype not in STORAGE_DTYPES:  # find_class only lets known storage names through
            raise pickle.UnpicklingError(f"refusing storage type {stype!r}")
        return _StorageRef(str(key), stype)


class TorchZip:
    """One torch zip checkpoint: `root()` unpickles the object graph (tensors as TensorRef),
    `materialize(tree)` replaces the refs in a sub-tree by numpy arrays."""

    def __init__(self, path: str):
        self.path = path
        try:
            self._zip = zipfile.ZipFile(path)
        except (zipfile.BadZipFile, OSError, ValueError) as e:
            raise ValueError(f"{path}: a damaged zip, not a readable torch file ({e})") from None
        names = self._zip.namelist()
        pkl = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
        if not pkl:
            raise ValueError(f"{path}: a zip without a top-level <name>/data.pkl; not a torch file")
        self.prefix = pkl[0].split("/")[0]
        self.torchscript = any(n.endswith("/constants.pkl") or "/code/" in n for n in names)
        order = f"{self.prefix}/byteorder"
        big = order in names and self._zip.read(order).strip() == b"big"
        self._endian = ">" if big else "<"

    def __enter__(self):
        return self

    def __exit__(self, *_):
        self._zip.close()

    def root(self):
        data = self._read(f"{self.prefix}/data.pkl")
        try:
            return RestrictedUnpickler(io.BytesIO(data)).load()
        except pickle.UnpicklingError as e:
            raise pickle.UnpicklingError(f"{self.path}: {e}") from None
        except Exception as e:  # cut short, wrong arguments to an allowed name, bad opcodes
            raise pickle.UnpicklingError(
                f"{self.path}: data.pkl is not a checkpoint this reader accepts "
                f"({type(e).__name__}: {e})"
            ) from None

    def _read(self, member: str) -> bytes:
        try:
            return self._zip.read(member)
        except (KeyError, EOFError, OSError, zipfile.BadZipFile, zlib.error) as e:
            raise ValueError(
                f"{self.path}: cannot read {member} ({e}); the file is damaged or cut short"
            ) from None

    def _storage(self, key: str, stype: str) -> np.ndarray:
        raw = self._read(f"{self.prefix}/data/{key}")
        dtype = STORAGE_DTYPES[stype]
        itemsize = 2 if dtype == "bfloat16" else np.dtype(dtype).itemsize
        if len(raw) % itemsize:
            raise ValueError(f"{self.path}: storage {key} of {len(raw)} bytes is no {stype}")
        if dtype == "bfloat16":  # the high 16 bits of a float32
            bits = np.frombuffer(raw, np.dtype(np.uint16).newbyteorder(self._endian))
            return (bits.astype(np.uint32) << 16).view(np.float32)
        return np.frombuffer(raw, np.dtype(dtype).newbyteorder(self._endian))

    def materialize(self, tree):
        """`tree` with every TensorRef in dicts, lists, tuples, Namespaces and Records replaced by
        a numpy array; each storage file is read once."""
        refs: dict[str, list[TensorRef]] = {}

        def collect(ref):
            refs.setdefault(ref.storage, []).append(ref)
            return ref

        _walk(tree, collect)
        arrays = {}
        for key, group in refs.items():
            storage = self._storage(key, group[0].dtype)
            for ref in group:
                arrays[ref] = _view(storage, ref, self.path)
        return _walk(tree, arrays.__getitem__)


def _view(storage: np.ndarray, ref: TensorRef, path: str) -> np.ndarray:
    """A copy of the strided view, after checking it stays inside the storage (numpy's
    as_strided does not, and a crafted file could otherwise read arbitrary memory)."""
    dims = ref.shape + ref.stride
    if ref.offset < 0 or len(ref.shape) != len(ref.stride) or min(dims, default=0) < 0:
        raise ValueError(f"{path}: malformed tensor {ref}")
    if 0 in ref.shape:
        return np.zeros(ref.shape, storage.dtype)
    last = ref.offset + sum((n - 1) * s for n, s in zip(ref.shape, ref.stride, strict=True))
    if last >= storage.size:
        raise ValueError(f"{path}: tensor {ref} reaches past its storage of {storage.size}")
    item = storage.itemsize
    view = np.lib.stride_tricks.as_strided(
        storage[ref.offset :], shape=ref.shape, strides=tuple(s * item for s in ref.stride)
    )
    return view.astype(storage.dtype.newbyteorder("="), copy=True)


def _walk(obj, leaf):
    """Rebuilt containers with `leaf` applied to each TensorRef (Records, Namespaces: in place)."""
    if isinstance(obj, TensorRef):
        return leaf(obj)
    if isinstance(obj, dict):
        out = type(obj)() if isinstance(obj, collections.OrderedDict) else {}
        out.update((k, _walk(v, leaf)) for k, v in obj.items())
        return out
    if isinstance(obj, list | tuple):
        return type(obj)(_walk(v, leaf) for v in obj)
    if isinstance(obj, Record):
        obj.state = _walk(obj.state, leaf)
    elif isinstance(obj, argparse.Namespace):
        vars(obj).update(_walk(vars(obj), leaf))
    return obj


def module_tensors(root) -> dict:
    """Dotted name -> tensor for every tensor attribute in a TorchScript module tree."""
    out: dict = {}

    def walk(obj, name):
        if isinstance(obj, TensorRef | np.ndarray):
            out[name] = obj
        elif isinstance(obj, Record):
            for k, v in obj.state.items():
                walk(v, f"{name}.{k}" if name else k)

    walk(root, "")
    return out


def module_classes(root) -> set[str]:
    """Qualified class names of every module in a TorchScript module tree (as pickled, e.g.
    "__torch__.torch.nn.modules.activation.GELU")."""
    out: set[str] = set()

    def walk(obj):
        if isinstance(obj, Record):
            out.add(obj.torch_class)
            for v in obj.state.values():
                walk(v)

    walk(root)
    return out


def read_torch_file(path: str, select=None):
    """The object a `.pt` file holds, or `select(object)`, with every tensor as numpy.

    Zip files (torch.save since torch 1.6, TorchScript archives) go through RestrictedUnpickler;
    a TorchScript archive gives {dotted attribute name: tensor}. `select` sees the object with
    tensors not yet read, so what it leaves out (an optimizer state) is never loaded. Only the
    legacy non-zip format needs torch: `torch.load(weights_only=True)`, which allows the same
    argparse.Namespace as this reader.
    """
    select = select or (lambda obj: obj)
    if zipfile.is_zipfile(path):
        with TorchZip(path) as z:
            root = z.root()
            return z.materialize(select(module_tensors(root) if z.torchscript else root))
    return torch_load_numpy(path, select)


def torch_load_numpy(path: str, select=None):
    """A legacy (or any) torch file through `torch.load(weights_only=True)`, which allows the
    same argparse.Namespace as RestrictedUnpickler, with `select(object)`'s tensors as numpy.
    Refusals and unreadable files raise naming the file."""
    import torch

    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # torch's refusal of a name or opcode
        raise pickle.UnpicklingError(
            f"{path}: refusing to load it: {_torch_refusal(e)} (torch.load with "
            "weights_only=True; nothing from the file was run)"
        ) from None
    except Exception as e:  # cut short, not a torch file at all
        raise ValueError(f"{path}: not a readable torch file ({type(e).__name__}: {e})") from None
    return _torch_to_numpy((select or (lambda o: o))(obj), path)


def _torch_refusal(error) -> str:
    """The reason in torch's weights-only refusal, without its advice to load the file with
    weights_only=False (which would run whatever it names)."""
    text = str(error)
    _, found, rest = text.partition("WeightsUnpickler error:")
    lines = [line.strip() for line in (rest if found else text).splitlines() if line.strip()]
    reasons = [line for line in lines if found or "nsupported" in line or "blocked" in line]
    return reasons[0].split(". Please")[0] if reasons else "a name or opcode it does not allow"


def _torch_to_numpy(obj, path: str, name: str = ""):
    import torch

    if torch.is_tensor(obj):  # .float() also widens bfloat16, which numpy lacks
        floats = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
        if obj.is_floating_point() and obj.dtype not in floats:  # float8: not widened quietly
            raise ValueError(
                f"{path}: tensor {name!r} has dtype {obj.dtype}, but weights are float16, "
                "bfloat16, float32 or float64"
            )
        return obj.float().numpy() if obj.is_floating_point() else obj.numpy()
    if isinstance(obj, dict):
        return type(obj)((k, _torch_to_numpy(v, path, _join(name, k))) for k, v in obj.items())
    if isinstance(obj, list | tuple):
        return type(obj)(_torch_to_numpy(v, path, _join(name, i)) for i, v in enumerate(obj))
    return obj


def _join(name: str, key) -> str:
    return f"{name}.{key}" if name else str(key)
