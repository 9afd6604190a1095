"""Read an ONNX file's graph (nodes and initializers) without the `onnx` package.

An ONNX file is one protobuf message (onnx.proto). This reads only the fields needed to port a
convolutional network's weights to torch: each node's op type, inputs, outputs and integer
attributes, and each initializer tensor (float32, stored as raw_data or float_data).
Weights kept in external files are not supported (the packaged U2-Net-p holds them inline).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

# Field numbers from onnx.proto.
MODEL_GRAPH = 7
GRAPH_NODE, GRAPH_INITIALIZER = 1, 5
NODE_INPUT, NODE_OUTPUT, NODE_NAME, NODE_OP_TYPE, NODE_ATTRIBUTE = 1, 2, 3, 4, 5
ATTR_NAME, ATTR_F, ATTR_I, ATTR_S, ATTR_INTS = 1, 2, 3, 4, 8
TENSOR_DIMS, TENSOR_DATA_TYPE, TENSOR_FLOAT_DATA, TENSOR_INT64_DATA, TENSOR_NAME, TENSOR_RAW_DATA = 1, 2, 4, 7, 8, 9
TENSOR_DATA_LOCATION = 14
DTYPES = {1: np.float32, 7: np.int64}  # TensorProto.DataType: FLOAT, INT64


@dataclass
class Node:
    op_type: str
    name: str
    inputs: list[str]
    outputs: list[str]
    attributes: dict[str, object] = field(default_factory=dict)  # ints, floats, int lists, strings


@dataclass
class Graph:
    nodes: list[Node]
    initializers: dict[str, np.ndarray]


def read_graph(path: str | Path) -> Graph:
    model = Path(path).read_bytes()
    graphs = [value for number, value in _fields(model) if number == MODEL_GRAPH]
    if len(graphs) != 1:
        raise ValueError(f"{path} is not an ONNX model (found {len(graphs)} graphs)")
    nodes, initializers = [], {}
    for number, value in _fields(graphs[0]):
        if number == GRAPH_NODE:
            nodes.append(_node(value))
        elif number == GRAPH_INITIALIZER:
            name, array = _tensor(value)
            initializers[name] = array
    return Graph(nodes, initializers)


def _node(message: bytes) -> Node:
    node = Node(op_type="", name="", inputs=[], outputs=[])
    for number, value in _fields(message):
        if number == NODE_INPUT:
            node.inputs.append(value.decode())
        elif number == NODE_OUTPUT:
            node.outputs.append(value.decode())
        elif number == NODE_NAME:
            node.name = value.decode()
        elif number == NODE_OP_TYPE:
            node.op_type = value.decode()
        elif number == NODE_ATTRIBUTE:
            name, attribute = _attribute(value)
            node.attributes[name] = attribute
    return node


def _attribute(message: bytes) -> tuple[str, object]:
    name, value, ints = "", None, []
    for number, field_value in _fields(message):
        if number == ATTR_NAME:
            name = field_value.decode()
        elif number == ATTR_F:
            value = float(np.frombuffer(field_value, "<f4")[0])
        elif number == ATTR_I:
            value = _signed(field_value)
        elif number == ATTR_S:
            value = field_value.decode(errors="replace")
        elif number == ATTR_INTS:
            ints.extend(_varints(field_value) if isinstance(field_value, bytes) else [_signed(field_value)])
    return name, (ints if ints else value)


def _tensor(message: bytes) -> tuple[str, np.ndarray]:
    name, dims, data_type, raw, floats, int64s = "", [], 1, None, [], []
    for number, value in _fields(message):
        if number == TENSOR_NAME:
            name = value.decode()
        elif number == TENSOR_DIMS:
            dims.extend(_varints(value) if isinstance(value, bytes) else [value])
        elif number == TENSOR_DATA_TYPE:
            data_type = value
        elif number == TENSOR_RAW_DATA:
            raw = value
        elif number == TENSOR_FLOAT_DATA:
            floats.extend(np.frombuffer(value, "<f4"))  # packed or one value: little-endian bytes
        elif number == TENSOR_INT64_DATA:
            int64s.extend(_varints(value) if isinstance(value, bytes) else [_signed(value)])
        elif number == TENSOR_DATA_LOCATION and value == 1:
            raise ValueError(f"initializer {name} is stored in an external file: not supported")
    if data_type not in DTYPES:
        raise ValueError(f"initializer {name} has ONNX data type {data_type}: only float32 and int64 are read")
    dtype = DTYPES[data_type]
    if raw is not None:
        array = np.frombuffer(raw, dtype=np.dtype(dtype).newbyteorder("<")).astype(dtype)
    else:
        array = np.asarray(floats if dtype is np.float32 else int64s, dtype=dtype)
    return name, array.reshape(dims)


# Protobuf wire format: each field is a varint key (number << 3 | wire type), then its value.
def _fields(message: bytes):
    """(field number, value) pairs: varints as int; fixed-width and length-delimited values as bytes
    (the caller knows whether they hold floats, packed numbers, strings or messages)."""
    view, position, end = memoryview(message), 0, len(message)
    while position < end:
        key, position = _varint(view, position)
        number, wire_type = key >> 3, key & 7
        if wire_type == 0:
            value, position = _varint(view, position)
        elif wire_type == 1:
            value, position = bytes(view[position:position + 8]), position + 8
        elif wire_type == 2:
            length, position = _varint(view, position)
            value, position = bytes(view[position:position + length]), position + length
        elif wire_type == 5:
            value, position = bytes(view[position:position + 4]), position + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire_type} (field {number})")
        yield number, value


def _varint(view, position: int) -> tuple[int, int]:
    result, shift = 0, 0
    while True:
        byte = view[position]
        position += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, position
        shift += 7


def _varints(packed: bytes) -> list[int]:
    view, position, values = memoryview(packed), 0, []
    while position < len(packed):
        value, position = _varint(view, position)
        values.append(_signed(value))
    return values


def _signed(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value
