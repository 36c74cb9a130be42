"""Read a pickled PyTorch checkpoint without running code from it.

`torch.load(..., weights_only=False)` imports and calls whatever the pickle names, so a `.ckpt` from the internet can
run arbitrary code, and a PyTorch Lightning checkpoint (its `callbacks` entry holds Lightning classes) fails without
`pytorch_lightning` installed. `torch.load(..., weights_only=True)` runs no code but refuses those classes.

[`safe_load`] runs torch's `weights_only` unpickler, which only builds tensors, storages and plain containers and only
calls allowlisted functions, with two additions: numpy scalars and arrays, and an inert placeholder
([`PickledObject`]) for every other class the pickle names. A placeholder is never imported: a Lightning callback
class used as a dict key, or an object rebuilt from its class and state (pickle's `NEWOBJ` and `BUILD`), becomes a
placeholder that records its arguments and state. Calling a placeholder (pickle's `REDUCE`, the way a pickle runs a
function such as `exec` or `subprocess.call`) raises [`UnsafeCheckpointError`] before anything runs. Tensors of a zip
checkpoint (`torch.save` since PyTorch 1.6) are memory-mapped: only the ones that are used are read from disk.

[`trusted_load`] is full unpickling, for trusted files that the safe loader refuses; it too makes placeholders of
the classes that cannot be imported, so a Lightning checkpoint does not need `pytorch_lightning`.
"""

from __future__ import annotations

import logging
import os
import pickle
import types
from typing import Any

import torch

__all__ = ["PickledObject", "UnsafeCheckpointError", "safe_load", "trusted_load"]

logger = logging.getLogger(__name__)


class UnsafeCheckpointError(ValueError):
    """[`safe_load`] cannot read the file: it calls a function outside the allowlist, names a blocked module, uses a
    pickle instruction torch's `weights_only` unpickler does not support, or is not a torch checkpoint."""


class _PlaceholderType(type):
    """Metaclass of the placeholders: calling a placeholder class (a pickle `REDUCE`) is refused."""

    def __call__(cls, *args, **kwargs):
        raise UnsafeCheckpointError(
            f"the pickle calls `{cls.__module__}.{cls.__qualname__}` while it is loaded, {cls._refusal}"
        )


class PickledObject(metaclass=_PlaceholderType):
    """
    Base class of the inert stand-ins for the classes a checkpoint names and [`safe_load`] does not import.

    An instance is made without calling anything from the original class: `args` holds the arguments pickle passed to
    `__new__`, `state` what it passed to `__setstate__` (`None` when absent).
    """

    _refusal = "and a safe load calls no function outside its allowlist"

    def __new__(cls, *args):
        instance = object.__new__(cls)
        object.__setattr__(instance, "args", args)
        object.__setattr__(instance, "state", None)
        return instance

    def __setstate__(self, state):
        object.__setattr__(self, "state", state)

    def __reduce__(self):
        raise TypeError(f"{type(self).__qualname__} is a placeholder read from a checkpoint and cannot be pickled")

    def __repr__(self) -> str:
        return f"<placeholder of {type(self).__module__}.{type(self).__qualname__}>"


def _placeholder(path: str, refusal: str | None = None) -> type[PickledObject]:
    """A new placeholder class named `path`; `refusal` ends the message of the error that calling it raises."""
    module, _, name = path.rpartition(".")
    namespace = {"__module__": module, "__qualname__": name}
    if refusal is not None:
        namespace["_refusal"] = refusal
    return _PlaceholderType(name, (PickledObject,), namespace)


def _numpy_globals() -> list[tuple[Any, str]]:
    """The numpy functions and classes needed to rebuild numpy scalars and arrays, under their pickled names."""
    try:
        import numpy as np
    except ImportError:
        return []
    try:
        from numpy._core import multiarray
    except ImportError:  # numpy < 2
        from numpy.core import multiarray
    found = [(np.ndarray, "numpy.ndarray"), (np.dtype, "numpy.dtype")]
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        found += [(multiarray._reconstruct, f"{module}._reconstruct"), (multiarray.scalar, f"{module}.scalar")]
    # `BUILD` on a dtype checks the type of the dtype instance, e.g. `numpy.dtypes.Float32DType`.
    dtype_classes = {type(np.dtype(code)) for code in np.typecodes["All"]}
    found += [(dtype_class, f"numpy.dtypes.{dtype_class.__name__}") for dtype_class in dtype_classes]
    return found


def _is_zip(path: str) -> bool:
    """Whether `path` is in torch's zip format (`torch.save` since PyTorch 1.6), by the check `torch.load` makes."""
    with open(path, "rb") as stream:
        return stream.read(4) == b"PK\x03\x04"


def _reason(error: Exception) -> str:
    """The short message of an unpickling error (torch appends a long explanation and hides the original)."""
    original = error.__context__ if isinstance(error.__context__, pickle.UnpicklingError) else error
    message = str(original).split("\n")[0].strip()
    return message if isinstance(original, pickle.UnpicklingError) else f"{type(original).__name__}: {message}"


def safe_load(path: str | os.PathLike) -> Any:
    """
    Unpickle a `torch.save` checkpoint on the CPU without importing or calling anything the file names, except
    tensors, storages, plain containers and numpy scalars and arrays.

    Every other class the pickle names becomes a [`PickledObject`] placeholder; a pickle that calls one (as a pickle
    that runs code does) is refused. Tensors of zip checkpoints are memory-mapped (read from disk when used); a legacy
    (non-zip) checkpoint is read whole and gets no placeholders.

    Args:
        path (`str` or `os.PathLike`):
            The checkpoint file.

    Returns:
        The unpickled object.

    Raises:
        [`UnsafeCheckpointError`]: The file is not a torch checkpoint, or holds something the safe loader refuses.
    """
    path = os.fspath(path)
    allowed = _numpy_globals()
    try:
        if not _is_zip(path):
            logger.warning("%s is a legacy (non-zip) torch checkpoint: it is read into memory whole.", path)
            with torch.serialization.safe_globals(allowed):
                return torch.load(path, map_location="cpu", weights_only=True)
        with torch.serialization.safe_globals(allowed):
            unknown = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        placeholders = [(_placeholder(name), name) for name in unknown]
        if placeholders:
            logger.info("Reading %s with placeholders for %s.", path, ", ".join(sorted(unknown)))
        with torch.serialization.safe_globals(allowed + placeholders):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (UnsafeCheckpointError, OSError):
        raise
    except Exception as error:  # a damaged or foreign file: the unpickler fails in many ways, none of which ran code
        raise UnsafeCheckpointError(_reason(error)) from error


class _TrustedUnpickler(pickle.Unpickler):
    """Full pickle, except that a class of a module that is not installed becomes a placeholder."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return super().find_class(module, name)
        except (ImportError, AttributeError):
            return _placeholder(f"{module}.{name}", "and it cannot be imported")


def _trusted_pickle_load(file, **kwargs) -> Any:
    return _TrustedUnpickler(file, **kwargs).load()


# The `pickle_module` of `torch.load`: what it uses of the `pickle` module.
_trusted_pickle = types.ModuleType("hf_distill_trusted_pickle")
_trusted_pickle.Unpickler = _TrustedUnpickler
_trusted_pickle.load = _trusted_pickle_load


def trusted_load(path: str | os.PathLike) -> Any:
    """
    Unpickle a `torch.save` checkpoint in full, on the CPU: this imports and calls what the file names, so it can run
    arbitrary code from the file. Only for files from a trusted source that [`safe_load`] refuses.

    The classes of modules that are not installed (e.g. PyTorch Lightning callbacks) become [`PickledObject`]
    placeholders instead of failing the load; tensors of zip checkpoints are memory-mapped. Takes and returns what
    [`safe_load`] does; raises [`UnsafeCheckpointError`] when the pickle calls a function or class that cannot be
    imported.
    """
    path = os.fspath(path)
    return torch.load(path, map_location="cpu", weights_only=False, mmap=_is_zip(path), pickle_module=_trusted_pickle)
