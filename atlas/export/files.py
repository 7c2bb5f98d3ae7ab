"""Saving an ONNX model so that no file is over `MAX_FILE_BYTES`: a larger initializer is cut
into row blocks joined by a Concat node, and weights go to external-data files of at most that
size each.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

MAX_FILE_BYTES = 90 * 2**20
"""Largest file written (below GitHub's 100 MB hard limit and the 95 MB the design allows)."""


def _split_large_initializers(model, max_bytes: int) -> None:
    """Cut each initializer larger than `max_bytes` into row blocks joined by a Concat node."""
    from onnx import helper, numpy_helper

    keep, extra_nodes = [], []
    for t in model.graph.initializer:
        arr = numpy_helper.to_array(t) if _nbytes(t) > max_bytes else None
        if arr is None or arr.ndim == 0 or arr.shape[0] < 2:
            keep.append(t)
            continue
        n = -(-arr.nbytes // max_bytes) + 1
        parts = np.array_split(arr, n, axis=0)
        names = [f"{t.name}__part{i}" for i in range(len(parts))]
        keep += [numpy_helper.from_array(p, nm) for p, nm in zip(parts, names)]
        extra_nodes.append(helper.make_node("Concat", names, [t.name], axis=0, name=f"{t.name}__concat"))
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    nodes = extra_nodes + list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)


def _nbytes(t) -> int:
    from onnx import helper

    n = int(np.prod(t.dims)) if t.dims else 1
    return n * helper.tensor_dtype_to_np_dtype(t.data_type).itemsize if t.data_type != 0 else 0


def _strip_metadata(model) -> None:
    """Drop what torch's exporter records about the code that traced the graph: each node's stack
    trace and source location (metadata_props, doc_string). They hold absolute paths of the
    machine that ran the export, which a published site would leak, and make a file's bytes
    depend on where the code was checked out."""
    for node in model.graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
    for field in (model.graph, model):
        del field.metadata_props[:]
        field.doc_string = ""


def save_model(model, path: Path) -> list[str]:
    """Save `model` at `path`, moving weights to `<name>.data<i>` files of at most MAX_FILE_BYTES
    when the whole would exceed it; without tracing metadata (`_strip_metadata`). Returns the file
    names written (the .onnx first)."""
    import onnx
    from onnx.external_data_helper import set_external_data

    path = Path(path)
    model = onnx.ModelProto.FromString(model.SerializeToString())  # the caller's copy keeps its weights
    _strip_metadata(model)
    if model.ByteSize() <= MAX_FILE_BYTES:
        onnx.save(model, path)
        return [path.name]
    _split_large_initializers(model, MAX_FILE_BYTES)
    files, handle, size = [], None, 0
    for t in sorted(model.graph.initializer, key=lambda t: -len(t.raw_data)):
        data = t.raw_data
        if len(data) < 1 << 16:
            continue  # small tensors stay inline
        if handle is None or size + len(data) > MAX_FILE_BYTES:
            if handle:
                handle.close()
            files.append(f"{path.name}.data{len(files)}")
            handle, size = open(path.parent / files[-1], "wb"), 0
        set_external_data(t, location=files[-1], offset=size, length=len(data))
        t.data_location = onnx.TensorProto.EXTERNAL
        handle.write(data)
        size += len(data)
        t.ClearField("raw_data")
    if handle:
        handle.close()
    (path).write_bytes(model.SerializeToString())
    return [path.name] + files
