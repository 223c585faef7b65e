"""Read a ``torch.save`` file or a TorchScript archive without executing anything from it.

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
* TorchScript archives (``torch.jit.save``; OpenAI's released CLIP ``.pt`` files) hold, beside the same
  ``data.pkl`` + storages, the TorchScript source of their classes, which ``torch.jit.load`` compiles and runs —
  a class's ``__setstate__`` runs while loading and can write any file. :func:`load_torchscript_weights` reads
  the modules' attributes from ``data.pkl`` instead and collects the parameters and buffers each class declares
  (``__parameters__`` / ``__buffers__`` lines of its source, read as text); a class that restores itself with its
  own ``__setstate__`` is refused.
* :func:`pickled_code_refusal` is the one error for a file whose pickles name anything beyond tensors and plain
  containers: it lists every such name.
"""

from __future__ import annotations

import _compat_pickle
import ast
import collections
import contextlib
import gzip
import io
import os
import pickle
import re
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
# TorchScript's pickler tags lists and dicts with their static types; the values are plain data.
_ALLOWED.update({("torch.jit._pickle", name): (lambda data: data)
                 for name in ("build_intlist", "build_tensorlist", "build_doublelist", "build_boollist")})
_ALLOWED[("torch.jit._pickle", "restore_type_tag")] = lambda value, _type_name: value
for _module in ("builtins", "__builtin__"):
    _ALLOWED.update({(_module, name): value for name, value in _SAFE_BUILTINS.items()})


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only allow-listed names; every other name becomes a :class:`Placeholder`.

    Args:
        file: the pickle stream.
        load_storage: ``(dtype, key, numel, view) -> _Storage`` for torch's persistent storage references.
        seen: a set that receives every replaced name as soon as it is met (kept when reading fails later).
    """

    def __init__(self, file: BinaryIO, load_storage=None, seen: set[str] | None = None):
        super().__init__(file, encoding="latin1")  # latin1: Python 2 pickles, as Dassl's loader falls back to
        self._load_storage = load_storage
        self._seen = seen if seen is not None else set()
        self.placeholders: dict[str, type] = {}

    def find_class(self, module: str, name: str) -> Any:
        # Protocol 0-2 pickles use Python 2 names (subprocess.Popen is written as commands.Popen); read them as
        # Python 3 names, as pickle itself does, so that allow-list and reports see the real name.
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        elif module in _compat_pickle.IMPORT_MAPPING:
            module = _compat_pickle.IMPORT_MAPPING[module]
        if module in ("torch", "torch.storage") and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        allowed = _ALLOWED.get((module, name))
        if allowed is not None:
            return allowed
        qualified = f"{module}.{name}"
        self._seen.add(qualified)
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


def _archive_prefix(archive: zipfile.ZipFile, source: str) -> str:
    """The folder inside the zip that holds ``data.pkl`` (``"<name>/"``, or ``""``)."""
    pickles = [n for n in archive.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
    if len(pickles) != 1:
        raise CheckpointError(f"{source}: a zip file but not a torch.save archive (no single data.pkl)")
    return pickles[0][: -len("data.pkl")]


def _unpickle_archive(archive: zipfile.ZipFile, prefix: str, source: str, seen: set[str]) -> tuple[Any, list[str]]:
    """``<prefix>data.pkl`` of a torch.save zip or a TorchScript archive, its storages read from ``<prefix>data/``."""
    names = set(archive.namelist())
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

    unpickler = RestrictedUnpickler(io.BytesIO(archive.read(f"{prefix}data.pkl")), load_storage, seen)
    result = unpickler.load()
    return result, sorted(unpickler.placeholders)


def _read_zip(handle: BinaryIO, source: str, seen: set[str]) -> tuple[Any, list[str]]:
    with zipfile.ZipFile(handle) as archive:
        return _unpickle_archive(archive, _archive_prefix(archive, source), source, seen)


def _read_legacy(handle: BinaryIO, source: str, total_bytes: int, seen: set[str]) -> tuple[Any, list[str]]:
    def small_pickle():
        return RestrictedUnpickler(handle, seen=seen).load()

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

    unpickler = RestrictedUnpickler(handle, load_storage, seen)
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
    return _load_pickled(checkpoint, set())


def _load_pickled(checkpoint: str | os.PathLike | bytes, seen: set[str]) -> tuple[Any, list[str]]:
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
    with _unreadable_as_checkpoint_error(source, "torch.save file"):
        if zipfile.is_zipfile(handle):
            handle.seek(0)
            return _read_zip(handle, source, seen)
        handle.seek(0)
        return _read_legacy(handle, source, len(data), seen)


@contextlib.contextmanager
def _unreadable_as_checkpoint_error(source: str, what: str):
    """Any error of a malformed pickle or zip becomes one :class:`CheckpointError` naming the file."""
    try:
        yield
    except CheckpointError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, IndexError, AttributeError,
            RuntimeError, zipfile.BadZipFile) as error:
        raise CheckpointError(f"{source}: not a readable {what} ({type(error).__name__}: {error})") from None


# --------------------------------------------------------------------------------------------- refusing code


def pickled_names(checkpoint: str | os.PathLike | bytes) -> list[str]:
    """Every name beyond tensors and plain containers that the pickles of a ``torch.save`` file refer to (the
    classes and functions ``torch.load`` would import and call), read without importing or calling any; names met
    before a read error are included."""
    seen: set[str] = set()
    with contextlib.suppress(CheckpointError):
        _load_pickled(checkpoint, seen)
    return sorted(seen)


def pickled_code_refusal(path: str | os.PathLike, names: list[str], advice: str = "") -> CheckpointError:
    """The one error for a file that holds pickled code: every name in it, command-running ones first."""
    names = sorted(names, key=lambda name: (not runs_code(name), name))
    tampered = " (a call that runs commands: the file was probably tampered with)" if any(map(runs_code, names)) \
        else ""
    return CheckpointError(f"refusing {os.fspath(path)}: it contains pickled code ({', '.join(names)}){tampered}; "
                           f"nothing from it was run" + (f". {advice[:1].upper()}{advice[1:]}" if advice else ""))


# --------------------------------------------------------------------------------------------- TorchScript


def is_torchscript_archive(path: str | os.PathLike) -> bool:
    """Is ``path`` a zip with TorchScript source (``<name>/code/``), i.e. written by ``torch.jit.save``?"""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.split("/", 1)[-1].startswith("code/") for name in archive.namelist())


def load_torchscript_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The parameters and buffers of a TorchScript archive, named as ``torch.jit.load(path).state_dict()`` names
    them, read without compiling or running any of the archive's code.

    Raises:
        CheckpointError: the archive names anything but TorchScript classes and tensors (listed), a class restores
            itself with its own ``__setstate__`` (its weights cannot be read without running it), or the archive
            is malformed.
    """
    source = os.fspath(path)
    advice = "Export the weights as a state dict (.safetensors) with a trusted tool"
    seen: set[str] = set()
    with zipfile.ZipFile(source) as archive, _unreadable_as_checkpoint_error(source, "TorchScript archive"):
        prefix = _archive_prefix(archive, source)

        def refuse_foreign_names() -> None:  # TorchScript's own pickles name only its classes (__torch__.*)
            foreign = [name for name in seen if not name.startswith("__torch__.")]
            if foreign:
                raise pickled_code_refusal(source, foreign, advice)

        try:
            root, _ = _unpickle_archive(archive, prefix, source, seen)
        except CheckpointError:
            refuse_foreign_names()  # a payload that broke the read is named rather than the damage it did
            raise
        refuse_foreign_names()
        declarations = _ClassDeclarations(archive, prefix)
        weights: dict[str, torch.Tensor] = {}
        _collect_module_tensors(root, "", declarations, weights, source, advice, set())
    return weights


class _ClassDeclarations:
    """What the TorchScript source of a class declares, read as text (never compiled): its parameter and buffer
    names and whether it defines ``__setstate__``. Class ``__torch__.a.b.C`` lives in ``code/__torch__/a/b.py``."""

    _CLASS = re.compile(r"^class (\w+)\(", re.MULTILINE)

    def __init__(self, archive: zipfile.ZipFile, prefix: str):
        self._archive, self._prefix = archive, prefix
        self._files: dict[str, dict[str, str]] = {}

    def body(self, qualified_name: str) -> str | None:
        module, _, name = qualified_name.rpartition(".")
        if module not in self._files:
            entry = f"{self._prefix}code/{module.replace('.', '/')}.py"
            text = self._archive.read(entry).decode("utf-8", "replace") if entry in self._archive.namelist() else ""
            starts = list(self._CLASS.finditer(text)) + [None]
            self._files[module] = {match.group(1): text[match.start(): following.start() if following else None]
                                   for match, following in zip(starts, starts[1:])}
        return self._files[module].get(name)

    def state_names(self, qualified_name: str) -> set[str] | None:
        """The declared parameters and buffers, or None when the class's source is not in the archive."""
        body = self.body(qualified_name)
        if body is None:
            return None
        names: set[str] = set()
        for kind in ("__parameters__", "__buffers__"):
            match = re.search(rf"^\s+{kind} = (\[[^\]]*\])", body, re.MULTILINE)
            if match:
                names.update(ast.literal_eval(match.group(1)))
        return names

    def restores_itself(self, qualified_name: str) -> bool:
        body = self.body(qualified_name)
        return body is not None and re.search(r"^\s+def __setstate__\(", body, re.MULTILINE) is not None


def _collect_module_tensors(module: Any, prefix: str, declarations: _ClassDeclarations,
                            weights: dict[str, torch.Tensor], source: str, advice: str, visiting: set[int]) -> None:
    """Walk the module tree of a TorchScript ``data.pkl`` (placeholders whose state is their attribute dict),
    adding each declared parameter and buffer to ``weights`` under its dotted path."""
    name = getattr(module, "qualified_name", "?")
    if not isinstance(module, Placeholder) or not name.startswith("__torch__."):
        raise CheckpointError(f"{source}: not a TorchScript module archive (found {module!r} where a module was "
                              f"expected)")
    if declarations.restores_itself(name) or not isinstance(module.state, dict):
        raise CheckpointError(f"refusing {source}: its TorchScript class {name.removeprefix('__torch__.')} restores "
                              f"itself with its own code (__setstate__), which vlprompt never runs; nothing from it "
                              f"was run. {advice}")
    if id(module) in visiting:
        return
    visiting.add(id(module))
    declared = declarations.state_names(name)
    for attribute, value in module.state.items():
        if isinstance(value, torch.Tensor):
            if declared is None or attribute in declared:
                weights[prefix + attribute] = value
        elif isinstance(value, Placeholder) and value.qualified_name.startswith("__torch__."):
            _collect_module_tensors(value, f"{prefix}{attribute}.", declarations, weights, source, advice, visiting)
