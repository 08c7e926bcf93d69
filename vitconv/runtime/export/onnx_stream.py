"""Writing an exported ONNX model one weight at a time.

torch's exporter hands over an onnx_ir model whose initializers are the module's own tensors.
``onnx_ir.save`` and ``onnx.save_model`` build the whole protobuf first (every weight copied,
then serialised again), and onnxruntime's float16 converter edits a protobuf and runs shape
inference on a full copy of it. Here the model becomes a :class:`Skeleton` instead: the
protobuf of everything but the weights, each weight (an initializer of 1 KiB or more) a
placeholder holding its name, type and shape, its data marked external. Graph edits, the
float16 conversion included (:func:`to_fp16`), run on the skeleton in a few MB;
:func:`write` then streams each weight from the module's tensor, in its placeholder's type,
into the ``.onnx`` itself or, above protobuf's 2 GB limit, into an external data file.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional

import numpy as np

#: Initializers from this size are weights, streamed at :func:`write`; smaller ones (shapes,
#: axes, scalars) stay in the skeleton, where shape inference and the converter read them.
WEIGHT_BYTES = 1024
#: protobuf cannot serialise a message over 2 GiB; above this, weights go to an external file.
INLINE_LIMIT = 2 * 1024**3 - 64 * 1024**2
_PLACEHOLDER = "<weights>"


@dataclass
class Skeleton:
    """``proto``: the model as a protobuf with placeholders for its weights; ``weights``: each
    placeholder's data, the exporter's tensor (in the exported type, float32)."""

    proto: object
    weights: Dict[str, object]

    def weight_bytes(self) -> int:
        """The weights' bytes in their placeholders' types (half the float32 bytes once a
        weight is float16)."""
        import onnx

        total = 0
        for t in self.proto.graph.initializer:
            if t.name in self.weights:
                itemsize = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
                total += int(np.prod(t.dims, dtype=np.int64)) * itemsize
        return total

    def is_large(self) -> bool:
        return self.weight_bytes() > INLINE_LIMIT


def skeleton(model) -> Skeleton:
    """The onnx_ir ``model`` as a :class:`Skeleton`; the model's initializers are unlinked
    (it no longer refers to any weight)."""
    import onnx
    import onnx_ir

    values = list(model.graph.initializers.values())
    model.graph.initializers.clear()
    proto = onnx_ir.serde.serialize_model(model)
    del proto.graph.value_info[:]  # the exporter's: stale once a graph edit runs shape inference
    weights = {}
    for value in values:
        data = value.const_value
        value.const_value = None
        if data.nbytes >= WEIGHT_BYTES:
            tensor = onnx.TensorProto(name=value.name, data_type=int(data.dtype), dims=list(data.shape))
            _locate(tensor, _PLACEHOLDER)
            weights[value.name] = data
        else:
            tensor = onnx_ir.serde.serialize_tensor(data)
            tensor.name = value.name
        proto.graph.initializer.append(tensor)
    return Skeleton(proto, weights)


@contextlib.contextmanager
def _replaced(module, name: str, value) -> Iterator[None]:
    """``module.name`` is ``value`` inside the block, and what it was again after (as on an error)."""
    saved = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, saved)


#: Ops whose argument is an angle: a float16 angle is off by up to 2**-11 of itself, a phase
#: error that grows with the grid (a rotary embedding's, a generated sin-cos table's).
ANGLE_OPS = ("Sin", "Cos")


def geometry_nodes(graph, data_input: str) -> List[str]:
    """The names of the nodes that compute an angle (:data:`ANGLE_OPS`) from the grid alone, and
    of every node before them that does not read the pixel values (positions, frequencies,
    their products): kept float32 in a float16 graph, as the libraries compute them. A value
    depends on the pixels where any input does, except through ``Shape``/``Size`` (a shape
    is integers whatever the pixels)."""
    tainted = {data_input}
    producer = {}
    for node in graph.node:  # topological order
        for o in node.output:
            producer[o] = node
        if node.op_type not in ("Shape", "Size") and any(i in tainted for i in node.input):
            tainted.update(node.output)
    keep, todo = set(), [n for n in graph.node if n.op_type in ANGLE_OPS and not set(n.input) & tainted]
    while todo:
        node = todo.pop()
        if node.name in keep:
            continue
        keep.add(node.name)
        todo += [producer[i] for i in node.input if i in producer and i not in tainted]
    return sorted(keep)


def to_fp16(proto, keep_fp32):
    """``onnxruntime.transformers.float16.convert_float_to_float16`` on ``proto`` (a skeleton's
    or a whole model's): float32 inputs and outputs, the ops ``keep_fp32``, the converter's
    default block list and the angles' nodes (:func:`geometry_nodes`) kept float32, then nodes
    re-sorted (the converter appends its casts).

    A placeholder's type becomes float16 where the converter would convert its data; its
    data is converted at :func:`write` with the converter's own rounding and clamping
    (:func:`to_float16`, its ``convert_np_to_float16`` bit for bit). The converter reads a
    converted initializer's data for one thing, its shape (``make_value_info_from_tensor``):
    while it runs, that function reads the shape off the tensor's ``dims`` instead, which is
    the same shape without the data."""
    import onnx_ir
    from onnx import helper
    from onnxruntime.transformers import float16

    del proto.graph.value_info[:]  # stale value_info conflicts with the converter's shape inference
    shape_only = lambda t: helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))  # noqa: E731
    with warnings.catch_warnings(), _replaced(float16, "make_value_info_from_tensor", shape_only):
        warnings.simplefilter("ignore")
        half = float16.convert_float_to_float16(
            proto, keep_io_types=True, op_block_list=list(float16.DEFAULT_OP_BLOCK_LIST) + list(keep_fp32),
            node_block_list=geometry_nodes(proto.graph, proto.graph.input[0].name))
    model = onnx_ir.from_proto(half)
    _skip_round_trips(model.graph)
    model.graph.sort()
    return onnx_ir.to_proto(model)


def _skip_round_trips(graph) -> None:
    """Where the converter put a float32 -> float16 -> float32 pair of Casts between two nodes it
    keeps float32 (it casts every kept node's output to float16, and back for the next one), the
    reader takes the float32 value itself: kept nodes compute in float32 from end to end (the
    angles of :func:`geometry_nodes`), never through a float16 rounding on the way."""
    import onnx_ir as ir

    for node in list(graph):
        if node.op_type != "Cast" or node.attributes["to"].as_int() != ir.DataType.FLOAT:
            continue
        first = node.inputs[0].producer()
        if first is None or first.op_type != "Cast" or first.attributes["to"].as_int() != ir.DataType.FLOAT16:
            continue
        original = first.inputs[0]
        if original.dtype != ir.DataType.FLOAT or node.outputs[0].is_graph_output():
            continue
        node.outputs[0].replace_all_uses_with(original)
        graph.remove(node, safe=True)
        if not first.outputs[0].uses() and not first.outputs[0].is_graph_output():
            graph.remove(first, safe=True)


def write(skel: Skeleton, path, data_path: Optional[os.PathLike] = None):
    """Write ``skel`` to ``path``: every weight inline, or with ``data_path`` every weight in that
    file (``location`` is its name, relative to ``path``'s folder). One weight is in memory at
    a time, beside the module's own tensor.

    Inline, the skeleton without initializers is written first, then each initializer as one
    more ``graph`` field (``ModelProto`` field 7) holding a ``GraphProto`` with that one
    ``initializer`` (field 5). Protobuf parsers merge repeated occurrences of a message field
    and concatenate its repeated fields (the encoding's documented behaviour), so every
    reader, onnx and onnxruntime included, sees one graph with all its initializers, in order.

    Returns the skeleton with each placeholder pointing at its data (its offset and length in
    the data file, or in the inline file itself: the ``raw_data`` bytes): the file's light
    description. Saved beside the file, it lets ``onnx.checker``'s ``full_check`` read every
    name, type and shape without loading any data, and onnxruntime read each weight from the
    file where it lies; given an inline file itself, both would parse it whole first."""
    import onnx

    proto = skel.proto
    head = onnx.ModelProto()
    head.CopyFrom(proto)
    del head.graph.initializer[:]
    if data_path is not None:
        with open(data_path, "wb") as data:
            for tensor in proto.graph.initializer:
                if tensor.name in skel.weights:
                    array = _payload(tensor, skel.weights.pop(tensor.name))
                    _locate(tensor, Path(data_path).name, offset=data.tell(), length=array.nbytes)
                    data.write(memoryview(array).cast("B"))
                    del array
        head.graph.initializer.extend(proto.graph.initializer)
        with open(path, "wb") as f:
            f.write(head.SerializeToString())
        return proto
    with open(path, "wb") as f:
        f.write(head.SerializeToString())
        del head
        for tensor in proto.graph.initializer:
            if tensor.name not in skel.weights:
                f.write(_key(7, _key(5, tensor.SerializeToString())))
                continue
            array = _payload(tensor, skel.weights.pop(tensor.name))
            meta = onnx.TensorProto(name=tensor.name, data_type=tensor.data_type, dims=tensor.dims)
            # TensorProto fields in number order: dims 1, data_type 2, name 8, then raw_data 9
            tensor_head = meta.SerializeToString() + _key_len(9, array.nbytes)
            size = len(tensor_head) + array.nbytes
            graph_head = _key_len(5, size)
            f.write(_key_len(7, len(graph_head) + size) + graph_head + tensor_head)
            _locate(tensor, Path(path).name, offset=f.tell(), length=array.nbytes)
            f.write(memoryview(array).cast("B"))
            del array
    return proto


#: The converter's defaults (``convert_float_to_float16(min_positive_val, max_finite_val)``).
FP16_MIN_POSITIVE, FP16_MAX_FINITE = np.float32(5.96e-08), np.float32(65504.0)


def to_float16(a: np.ndarray) -> np.ndarray:
    """onnxruntime's ``convert_np_to_float16`` with the converter's defaults, bit for bit:
    nonzero magnitudes below :data:`FP16_MIN_POSITIVE` become it, finite ones above
    :data:`FP16_MAX_FINITE` become that (signs kept; zeros, infinities and NaN unchanged),
    then float16. That function finds the values with ``np.where`` index arrays over each
    sign, four passes and int64 temporaries as large as the tensor: 16 of the 37 s of an
    L/16 float16 export. Here one mask, and a copy only when some value needs moving."""
    m = np.abs(a)
    move = ((m > 0) & (m < FP16_MIN_POSITIVE)) | ((m > FP16_MAX_FINITE) & (m < np.inf))
    if move.any():
        a = a.copy()
        a[move] = np.copysign(np.where(m[move] < FP16_MIN_POSITIVE, FP16_MIN_POSITIVE, FP16_MAX_FINITE), a[move])
    return a.astype(np.float16)


def _payload(tensor, data) -> np.ndarray:
    """The weight ``data`` (an onnx_ir tensor) as a contiguous array of ``tensor``'s type."""
    import onnx

    array = np.ascontiguousarray(data.numpy())
    want = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type))
    if array.dtype == want:
        return array
    if (array.dtype, want) == (np.float32, np.float16):
        return to_float16(array)
    raise TypeError(f"weight {tensor.name}: {array.dtype} cannot become {want}")


def _locate(tensor, location: str, offset: Optional[int] = None, length: Optional[int] = None) -> None:
    import onnx

    tensor.data_location = onnx.TensorProto.EXTERNAL
    del tensor.external_data[:]
    for key, value in (("location", location), ("offset", offset), ("length", length)):
        if value is not None:
            entry = tensor.external_data.add()
            entry.key, entry.value = key, str(value)


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _key_len(number: int, length: int) -> bytes:
    """A length-delimited protobuf field's key (wire type 2) and length."""
    return _varint((number << 3) | 2) + _varint(length)


def _key(number: int, payload: bytes) -> bytes:
    """One whole length-delimited protobuf field."""
    return _key_len(number, len(payload)) + payload
