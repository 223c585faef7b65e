"""Read a ``torch.save`` file without executing anything from it.

Checkpoints of the Dassl-based code bases are pickles that hold, beside the tensors, optimizer and scheduler
*objects* (Dassl's warm-up scheduler wraps a torch ``CosineAnnealingLR`` that references the optimizer). A
plain ``torch.load`` imports and calls whatever the pickle names — a tampered file can run ``os.system`` —
and ``torch.load(weights_only=True)`` refuses these files outright. This reader sits between the two:

* :class:`RestrictedUnpickler` resolves only an allow-list of names: torch's tensor rebuild functions (replaced
  by our own implementations that only slice bytes into tensors), the storage type names (which only select a
  dtype), dtypes, ``torch.Size``, ``collections.OrderedDict`` and a few builtin containers.
* Every other name — a scheduler class, ``os.system``, ``builtins.eval``, ``subprocess.Popen`` — resolves to a
  fresh subclass of :class:`Placeholder`. Calling it, instantiating it or setting its state only records the
  arguments: no module is imported and no function from the file is ever called.
* Storages are read from the archive by us: the zip format (``<name>/data.pkl`` + ``<name>/data/<key>``) and
  the legacy format (a sequence of pickles followed by the raw storages). A gzip-compressed file is
  decompressed first; a ``.pth.tar`` name is an ordinary ``torch.save`` file.
"""

from __future__ import annotations

import collections
import gzip
import io
import os
import pickle
import zipfile
from typing import Any, BinaryIO

import torch

from vlprompt.errors import CheckpointError

LEGACY_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL_VERSION = 1001

# Names whose appearance in a checkpoint means someone tried to run code on load (reported, never called).
CODE_RUNNING_MODULES = ("os", "posix", "nt", "subprocess", "sys", "shutil", "socket", "importlib", "runpy",
                        "pty", "ctypes", "code", "webbrowser")
CODE_RUNNING_BUILTINS = ("eval", "exec", "compile", "open", "__import__", "getattr", "setattr", "delattr",
                         "globals", "locals", "vars", "input", "breakpoint")

_STORAGE_DTYPES = {
    "DoubleStorage": torch.float64, "FloatStorage": torch.float32, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool, "ComplexFloatStorage": torch.complex64, "ComplexDoubleStorage": torch.complex128,
    "UntypedStorage": torch.uint8,
}
_DTYPE_NAMES = ("float64", "float32", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool",
                "complex64", "complex128", "double", "float", "half", "long", "int", "short")
_SAFE_BUILTINS = {"set": set, "frozenset": frozenset, "list": list, "dict": dict, "tuple": tuple,
                  "complex": complex, "slice": slice}  # no bytearray: bytearray(10**12) would allocate


class Placeholder:
    """An inert stand-in for a pickled object, class or function that is not on the allow-list.

    ``qualified_name`` is the name the pickle asked for (e.g. ``"dassl.optim.lr_scheduler.ConstantWarmupScheduler"``
    or ``"posix.system"``); ``args`` and ``state`` hold what the pickle passed to it, as data only.
    """

    qualified_name = "?"

    def __new__(cls, *args, **kwargs):
        return super().__new__(cls)

    def __init__(self, *args, **kwargs):
        self.args = args
        self.kwargs = kwargs
        self.state: Any = None
        self.items: list = []

    def __setstate__(self, state: Any) -> None:
        self.state = state

    # list/dict-like pickles (APPENDS / SETITEMS on a reconstructed object) land here, as data.
    def append(self, item: Any) -> None:
        self.items.append(item)

    def extend(self, items) -> None:
        self.items.extend(items)

    def __setitem__(self, key: Any, value: Any) -> None:
        self.items.append((key, value))

    def __repr__(self) -> str:
        return f"<not loaded: {self.qualified_name}>"


def runs_code(qualified_name: str) -> bool:
    """Whether a pickled name is a function that runs commands or code (a payload, never called here)."""
    module, _, name = qualified_name.rpartition(".")
    root = module.split(".")[0]
    return root in CODE_RUNNING_MODULES or (root in ("builtins", "__builtin__") and name in CODE_RUNNING_BUILTINS)


class _StorageType:
    """What a storage class name (``torch.FloatStorage``) resolves to: only its dtype. A fresh one per lookup,
    so a pickle that sets attributes on what it resolved cannot affect any other load."""

    __slots__ = ("dtype",)

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype


class _Storage:
    """A flat 1-D tensor over the bytes of one storage (filled later in the legacy format)."""

    def __init__(self, flat: torch.Tensor):
        self.flat = flat


def _flat_from_buffer(buffer: bytearray, dtype: torch.dtype) -> torch.Tensor:
    if len(buffer) == 0:
        return torch.empty(0, dtype=dtype)
    return torch.frombuffer(buffer, dtype=dtype)  # shares memory with ``buffer``


def _rebuild_tensor(storage, storage_offset, size, stride, *_ignored) -> torch.Tensor:
    """Our ``torch._utils._rebuild_tensor(_v2)``: a strided view of a storage, bounds-checked."""
    if not isinstance(storage, _Storage):
        raise CheckpointError(f"a tensor in the checkpoint refers to {storage!r} instead of a storage")
    size, stride = tuple(size), tuple(stride)
    numbers = (storage_offset,) + size + stride
    if len(size) != len(stride) or not all(isinstance(n, int) and n >= 0 for n in numbers):
        raise CheckpointError(f"a tensor in the checkpoint has an invalid layout (size {size}, stride {stride})")
    if 0 not in size:
        last = storage_offset + sum((n - 1) * s for n, s in zip(size, stride))
        if last >= storage.flat.numel():
            raise CheckpointError(f"a tensor in the checkpoint (size {size}) lies outside its storage")
    return storage.flat.as_strided(size, stride, storage_offset)


def _rebuild_parameter(data, *_ignored) -> Any:
    """``torch._utils._rebuild_parameter(_with_state)``: a parameter is loaded as its plain tensor."""
    return data


def _rebuild_from_type(function, _new_type, args, _state) -> Any:
    """``torch._tensor._rebuild_from_type_v2``: rebuild with ``function`` (itself resolved by the allow-list)."""
    return function(*args)


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    """``_codecs.encode`` as protocol-2 pickles use it for ``bytes``; any other codec is refused."""
    if encoding.replace("-", "").lower() != "latin1":
        raise CheckpointError(f"the checkpoint asks for the text codec {encoding!r}; refused")
    return text.encode("latin1")


_ALLOWED: dict[tuple[str, str], Any] = {
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch", "Size"): torch.Size,
    ("_codecs", "encode"): _latin1_encode,
}
_ALLOWED.update({("torch", name): getattr(torch, name) for name in _DTYPE_NAMES})
for _module in ("builtins", "__builtin__"):
    _ALLOWED.update({(_module, name): value for name, value in _SAFE_BUILTINS.items()})


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only allow-listed names; every other name becomes a :class:`Placeholder`.

    Args:
        file: the pickle stream.
        load_storage: ``(dtype, key, numel, view) -> _Storage`` for torch's persistent storage references.
    """

    def __init__(self, file: BinaryIO, load_storage=None):
        super().__init__(file, encoding="latin1")  # latin1: Python 2 pickles, as Dassl's loader falls back to
        self._load_storage = load_storage
        self.placeholders: dict[str, type] = {}

    def find_class(self, module: str, name: str) -> Any:
        if module in ("torch", "torch.storage") and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        allowed = _ALLOWED.get((module, name))
        if allowed is not None:
            return allowed
        qualified = f"{module}.{name}"
        if qualified not in self.placeholders:
            self.placeholders[qualified] = type(name, (Placeholder,), {"qualified_name": qualified})
        return self.placeholders[qualified]

    def persistent_load(self, saved_id: Any) -> Any:
        if not isinstance(saved_id, tuple) or not saved_id:
            raise CheckpointError(f"unexpected persistent reference {saved_id!r} in the checkpoint")
        kind = saved_id[0].decode("ascii") if isinstance(saved_id[0], bytes) else saved_id[0]
        if kind != "storage" or self._load_storage is None:
            return self.find_class("torch.serialization", f"persistent_{kind}")(*saved_id[1:])
        storage_type, key, _location, numel = saved_id[1:5]
        view = saved_id[5] if len(saved_id) > 5 else None
        if not isinstance(storage_type, _StorageType):
            raise CheckpointError(f"storage {key!r} of the checkpoint has the unsupported type {storage_type!r}")
        if not isinstance(numel, int) or numel < 0:
            raise CheckpointError(f"storage {key!r} of the checkpoint has an invalid size {numel!r}")
        return self._load_storage(storage_type.dtype, str(key), numel, view)


def _element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _read_zip(handle: BinaryIO, source: str) -> tuple[Any, list[str]]:
    with zipfile.ZipFile(handle) as archive:
        names = archive.namelist()
        pickles = [n for n in names if n.endswith("/data.pkl") or n == "data.pkl"]
        if len(pickles) != 1:
            raise CheckpointError(f"{source}: a zip file but not a torch.save archive (no single data.pkl)")
        prefix = pickles[0][: -len("data.pkl")]
        byteorder = f"{prefix}byteorder"
        if byteorder in names and archive.read(byteorder).strip() not in (b"little", b""):
            raise CheckpointError(f"{source}: big-endian checkpoints are not supported")
        storages: dict[str, _Storage] = {}

        def load_storage(dtype, key, numel, _view):
            if key not in storages:
                entry = f"{prefix}data/{key}"
                if entry not in names:
                    raise CheckpointError(f"{source}: storage {key!r} is missing from the archive")
                expected = numel * _element_size(dtype)
                if archive.getinfo(entry).file_size != expected:
                    raise CheckpointError(f"{source}: storage {key!r} has {archive.getinfo(entry).file_size} "
                                          f"bytes, expected {expected}")
                storages[key] = _Storage(_flat_from_buffer(bytearray(archive.read(entry)), dtype))
            return storages[key]

        unpickler = RestrictedUnpickler(io.BytesIO(archive.read(pickles[0])), load_storage)
        result = unpickler.load()
    return result, sorted(unpickler.placeholders)


def _read_legacy(handle: BinaryIO, source: str, total_bytes: int) -> tuple[Any, list[str]]:
    def small_pickle():
        return RestrictedUnpickler(handle).load()

    if small_pickle() != LEGACY_MAGIC_NUMBER:
        raise CheckpointError(f"{source}: not a torch.save file (neither a zip archive nor the legacy format)")
    if small_pickle() != LEGACY_PROTOCOL_VERSION:
        raise CheckpointError(f"{source}: unsupported legacy torch.save protocol version")
    system = small_pickle()
    if isinstance(system, dict) and not system.get("little_endian", True):
        raise CheckpointError(f"{source}: big-endian checkpoints are not supported")

    roots: dict[str, tuple[bytearray, _Storage]] = {}
    views: dict[str, _Storage] = {}
    budget = [total_bytes]  # storages cannot hold more bytes than the file: no allocation bombs

    def load_storage(dtype, key, numel, view):
        if key not in roots:
            nbytes = numel * _element_size(dtype)
            budget[0] -= nbytes
            if budget[0] < 0:
                raise CheckpointError(f"{source}: storage sizes exceed the file size (corrupt or truncated file)")
            buffer = bytearray(nbytes)
            roots[key] = (buffer, _Storage(_flat_from_buffer(buffer, dtype)))
        root = roots[key][1]
        if view is None:
            return root
        view_key, offset, size = view
        if view_key not in views:
            if not (isinstance(offset, int) and isinstance(size, int) and 0 <= offset <= offset + size
                    <= root.flat.numel()):
                raise CheckpointError(f"{source}: storage view {view_key!r} lies outside its storage")
            views[view_key] = _Storage(root.flat[offset: offset + size])
        return views[view_key]

    unpickler = RestrictedUnpickler(handle, load_storage)
    result = unpickler.load()
    keys = small_pickle()
    if not isinstance(keys, list):
        raise CheckpointError(f"{source}: corrupt legacy checkpoint (no storage list)")
    for key in keys:
        if key not in roots:
            raise CheckpointError(f"{source}: corrupt legacy checkpoint (unknown storage {key!r})")
        buffer, storage = roots[key]
        header = handle.read(8)
        numel = int.from_bytes(header, "little") if len(header) == 8 else -1
        if numel != storage.flat.numel() or handle.readinto(memoryview(buffer)) != len(buffer):
            raise CheckpointError(f"{source}: storage {key!r} is truncated or has the wrong size")
    return result, sorted(unpickler.placeholders)


def load_pickled(checkpoint: str | os.PathLike | bytes) -> tuple[Any, list[str]]:
    """Read a ``torch.save`` file (zip or legacy format, optionally gzip-compressed) without running its code.

    Args:
        checkpoint: a path, or the file's bytes.

    Returns:
        ``(object, placeholder_names)``: the saved object with tensors materialised (on the CPU) and every
        non-allow-listed object replaced by a :class:`Placeholder`; the qualified names that were replaced.
    """
    if isinstance(checkpoint, (bytes, bytearray)):
        data, source = bytes(checkpoint), "<bytes>"
    else:
        source = os.fspath(checkpoint)
        if not os.path.isfile(source):
            raise CheckpointError(f"checkpoint file not found: {source}")
        with open(source, "rb") as handle:
            data = handle.read()
    if data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as error:
            raise CheckpointError(f"{source}: corrupt gzip file ({error})") from None
    handle = io.BytesIO(data)
    try:
        if zipfile.is_zipfile(handle):
            handle.seek(0)
            return _read_zip(handle, source)
        handle.seek(0)
        return _read_legacy(handle, source, len(data))
    except CheckpointError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, IndexError, AttributeError,
            RuntimeError, zipfile.BadZipFile) as error:
        raise CheckpointError(f"{source}: not a readable torch.save file ({type(error).__name__}: {error})") from None
