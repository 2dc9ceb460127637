"""Graph surgery on a batchwbc ONNX model's last layer: expose the embedding, swap the head.

`batchwbc adapt` refits only the final classifier layer, on the *embedding* (the input of
that layer), so the runtime must be able to read that tensor and write new weights back.
A batchwbc graph ends in

    embedding -> MatMul(W) -> Add(b) | Gemm(W, b) -> [Mul(1/T) | Div(T)] -> Softmax -> probs

(tf2onnx writes `softmax(logits / T)` as Mul by the reciprocal; the test models have no
temperature node). Everything here works on an `onnx.ModelProto` with the `onnx` package
only, no onnxruntime, no TensorFlow. Adding the embedding output renames the existing tensor
instead of inserting a node, so the graph computes exactly what it computed before.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # onnx and numpy are imported where they are used
    import numpy as np
    import onnx

#: Metadata: name of the graph output that returns the embedding, and its width.
from batchwbc.engine.model_metadata import KEY_EMBEDDING_DIM, KEY_EMBEDDING_OUTPUT  # noqa: E402 - re-exported
#: The name this module gives the embedding output.
EMBEDDING_OUTPUT = "embedding"


class GraphError(Exception):
    """A graph whose last layer cannot be found or changed; str is one sentence."""


@dataclass(frozen=True)
class Head:
    """Where the final layer lives in the graph (node indices and tensor names)."""

    embedding: str  # tensor feeding the final layer
    weight: str  # initializer [D, K] (or [K, D] for Gemm with transB=1)
    weight_transposed: bool
    bias: str | None  # initializer [K] or None when the layer has no bias
    layer_node: int  # index of the MatMul / Gemm node
    bias_node: int | None  # index of the Add node after a MatMul, if any
    logits: str  # tensor with the layer's output (after the bias)
    temperature_node: int | None  # Mul(1/T) or Div(T) between the logits and the softmax
    temperature_const: str | None
    dim: int
    classes: int


def _producers(graph) -> dict[str, int]:
    return {out: i for i, node in enumerate(graph.node) for out in node.output}


def _scalar_constant(graph, name: str) -> float | None:
    """Value of a scalar (or one-element) initializer or Constant node, else None."""
    import numpy as np
    from onnx import numpy_helper

    for init in graph.initializer:
        if init.name == name:
            arr = numpy_helper.to_array(init)
            return float(arr.reshape(-1)[0]) if arr.size == 1 else None
    for node in graph.node:
        if node.op_type == "Constant" and node.output[0] == name:
            for attr in node.attribute:
                if attr.name == "value":
                    arr = numpy_helper.to_array(attr.t)
                    return float(np.asarray(arr).reshape(-1)[0]) if arr.size == 1 else None
    return None


def _initializer(graph, name: str):
    return next((init for init in graph.initializer if init.name == name), None)


def find_head(model: "onnx.ModelProto") -> Head:
    """Walk back from the probability output (the first graph output) to the final layer."""
    from onnx import numpy_helper

    graph = model.graph
    prod = _producers(graph)

    def producer(tensor: str, what: str) -> int:
        i = prod.get(tensor)
        while i is not None and graph.node[i].op_type == "Identity":
            tensor = graph.node[i].input[0]
            i = prod.get(tensor)
        if i is None:
            raise GraphError(f"the graph has no node computing {what}.")
        return i

    i_soft = producer(graph.output[0].name, "the probability output")
    if graph.node[i_soft].op_type != "Softmax":
        raise GraphError(f"the probability output is computed by {graph.node[i_soft].op_type}, not Softmax.")
    i = producer(graph.node[i_soft].input[0], "the softmax input")
    t_node, t_const = None, None
    node = graph.node[i]
    if node.op_type in ("Mul", "Div"):
        consts = [x for x in node.input if _scalar_constant(graph, x) is not None]
        if len(consts) == 1 and (node.op_type == "Mul" or node.input[1] == consts[0]):
            t_node, t_const = i, consts[0]
            other = node.input[0] if node.input[1] == consts[0] else node.input[1]
            i = producer(other, "the logits")
            node = graph.node[i]
    logits = node.output[0]
    bias, bias_node = None, None
    if node.op_type == "Add":
        inits = [x for x in node.input if _initializer(graph, x) is not None]
        if len(inits) != 1:
            raise GraphError("the final Add does not add one constant bias.")
        bias, bias_node = inits[0], i
        other = node.input[1] if node.input[0] == bias else node.input[0]
        i = producer(other, "the final layer")
        node = graph.node[i]
    if node.op_type == "MatMul":
        weight, transposed = node.input[1], False
        embedding = node.input[0]
    elif node.op_type == "Gemm" and bias is None:
        attrs = {a.name: a for a in node.attribute}
        if attrs.get("transA") and attrs["transA"].i:
            raise GraphError("the final Gemm transposes its input, which batchwbc does not handle.")
        if any(k in attrs and abs(attrs[k].f - 1.0) > 1e-12 for k in ("alpha", "beta")):
            raise GraphError("the final Gemm scales by alpha/beta, which batchwbc does not handle.")
        weight, transposed = node.input[1], bool(attrs.get("transB") and attrs["transB"].i)
        embedding = node.input[0]
        if len(node.input) > 2 and node.input[2]:
            bias = node.input[2]
    else:
        raise GraphError(f"the layer before the softmax is {node.op_type}, not a dense (MatMul/Gemm) layer.")
    w_init = _initializer(graph, weight)
    if w_init is None:
        raise GraphError("the final layer's weights are not a plain constant (a quantized model?).")
    w = numpy_helper.to_array(w_init)
    if w.ndim != 2:
        raise GraphError("the final layer's weights are not a matrix.")
    dim, k = (w.shape[1], w.shape[0]) if transposed else w.shape
    if bias is not None:
        b_init = _initializer(graph, bias)
        if b_init is None or numpy_helper.to_array(b_init).size != k:
            raise GraphError("the final layer's bias is not a constant with one value per class.")
    return Head(embedding=embedding, weight=weight, weight_transposed=transposed, bias=bias, layer_node=i,
                bias_node=bias_node, logits=logits, temperature_node=t_node, temperature_const=t_const,
                dim=int(dim), classes=int(k))


def head_parameters(model: "onnx.ModelProto") -> tuple["np.ndarray", "np.ndarray", float]:
    """(W [D, K], b [K], T) of the final layer: logits = embedding @ W + b, probs = softmax(logits / T)."""
    import numpy as np
    from onnx import numpy_helper

    head = find_head(model)
    graph = model.graph
    w = numpy_helper.to_array(_initializer(graph, head.weight)).astype(np.float64)
    if head.weight_transposed:
        w = w.T
    b = (numpy_helper.to_array(_initializer(graph, head.bias)).astype(np.float64).reshape(-1)
         if head.bias is not None else np.zeros(head.classes))
    t = 1.0
    if head.temperature_node is not None:
        value = _scalar_constant(graph, head.temperature_const)
        t = 1.0 / value if graph.node[head.temperature_node].op_type == "Mul" else value
    return w, b, float(t)


def _metadata(model) -> dict[str, str]:
    return {p.key: p.value for p in model.metadata_props}


def _set_metadata(model, meta: dict[str, str]) -> None:
    del model.metadata_props[:]
    for key, value in meta.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value


def embedding_output(model: "onnx.ModelProto") -> str | None:
    """The embedding output's name when the model has one (metadata and graph agree), else None."""
    name = _metadata(model).get(KEY_EMBEDDING_OUTPUT)
    return name if name and name in {o.name for o in model.graph.output} else None


def add_embedding_output(model: "onnx.ModelProto", name: str = EMBEDDING_OUTPUT) -> "onnx.ModelProto":
    """Return a copy whose graph also outputs the final layer's input as `name` [N, D].

    The tensor is renamed in place (its producer and every consumer), so no node is added and
    the probabilities are computed exactly as before. Idempotent.
    """
    import onnx
    from onnx import TensorProto, helper

    out = onnx.ModelProto()
    out.CopyFrom(model)
    if embedding_output(out) == name:
        return out
    graph = out.graph
    head = find_head(out)
    old = head.embedding
    if old != name:
        if name in {t for node in graph.node for t in list(node.input) + list(node.output)}:
            raise GraphError(f"the graph already has a tensor named {name!r}.")
        if old in {i.name for i in graph.input} or _initializer(graph, old) is not None:
            raise GraphError("the final layer's input is a graph input or constant, not a computed embedding.")
        for node in graph.node:
            for seq in (node.input, node.output):
                for j, t in enumerate(seq):
                    if t == old:
                        seq[j] = name
        for vi in graph.value_info:
            if vi.name == old:
                vi.name = name
        for o in graph.output:
            if o.name == old:
                o.name = name
    if name not in {o.name for o in graph.output}:
        batch = graph.output[0].type.tensor_type.shape.dim[0]
        dim0 = batch.dim_param or (batch.dim_value if batch.HasField("dim_value") else "N")
        graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, [dim0 or "N", head.dim]))
    meta = _metadata(out)
    meta[KEY_EMBEDDING_OUTPUT] = name
    meta[KEY_EMBEDDING_DIM] = str(head.dim)
    _set_metadata(out, meta)
    return out


def replace_head(model: "onnx.ModelProto", weight: "np.ndarray", bias: "np.ndarray", temperature: float,
                 metadata: dict[str, str] | None = None) -> "onnx.ModelProto":
    """Return a copy with a new final layer (W [D, K], b [K]) and temperature T, and metadata
    updated with `metadata`. The graph keeps its shape: the same nodes, new constants."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    head = find_head(out)
    weight = np.asarray(weight, dtype=np.float32)
    bias = np.asarray(bias, dtype=np.float32).reshape(-1)
    if weight.shape != (head.dim, head.classes) or bias.shape != (head.classes,):
        raise GraphError(f"new head has shape {weight.shape}/{bias.shape}; the graph needs ({head.dim}, {head.classes})/({head.classes},).")
    if not (np.isfinite(temperature) and temperature > 0):
        raise GraphError(f"temperature {temperature!r} is not a positive number.")

    def fresh(stem: str) -> str:
        names = {t for node in graph.node for t in list(node.input) + list(node.output)}
        names |= {i.name for i in graph.initializer}
        k = 0
        while f"{stem}_{k}" in names:
            k += 1
        return f"{stem}_{k}"

    def rebind(node_index: int, old: str, array: np.ndarray, stem: str) -> None:
        # New initializers under fresh names: never alter a constant another node shares.
        new = fresh(stem)
        graph.initializer.append(numpy_helper.from_array(array, new))
        node = graph.node[node_index]
        for j, t in enumerate(node.input):
            if t == old:
                node.input[j] = new

    rebind(head.layer_node, head.weight, weight.T.copy() if head.weight_transposed else weight, "batchwbc_head_W")
    if head.bias is not None:
        rebind(head.bias_node if head.bias_node is not None else head.layer_node, head.bias, bias, "batchwbc_head_b")
    else:  # a MatMul without bias: add one after it
        b_name, new_logits = fresh("batchwbc_head_b"), fresh("batchwbc_head_logits")
        graph.initializer.append(numpy_helper.from_array(bias, b_name))
        _redirect(graph, head.logits, new_logits)
        graph.node.insert(head.layer_node + 1, helper.make_node("Add", [new_logits, b_name], [head.logits]))
        head = find_head(out)
    if head.temperature_node is not None:
        node = graph.node[head.temperature_node]
        value = 1.0 / temperature if node.op_type == "Mul" else temperature
        rebind(head.temperature_node, head.temperature_const, np.array(value, dtype=np.float32), "batchwbc_head_T")
    elif abs(temperature - 1.0) > 1e-12:
        t_name, new_logits = fresh("batchwbc_head_invT"), fresh("batchwbc_head_logits")
        graph.initializer.append(numpy_helper.from_array(np.array(1.0 / temperature, dtype=np.float32), t_name))
        _redirect(graph, head.logits, new_logits)
        producer = _producers(graph)[new_logits]
        graph.node.insert(producer + 1, helper.make_node("Mul", [new_logits, t_name], [head.logits]))
    _drop_unused_initializers(graph)
    meta = _metadata(out)
    meta.update(metadata or {})
    _set_metadata(out, meta)
    onnx.checker.check_model(out)
    return out


def _redirect(graph, old: str, new: str) -> None:
    """Make the node that produces `old` produce `new` instead (consumers still read `old`)."""
    for node in graph.node:
        for j, t in enumerate(node.output):
            if t == old:
                node.output[j] = new


def _drop_unused_initializers(graph) -> None:
    used = {t for node in graph.node for t in node.input} | {o.name for o in graph.output}
    keep = [init for init in graph.initializer if init.name in used]
    if len(keep) != len(graph.initializer):
        del graph.initializer[:]
        graph.initializer.extend(keep)

