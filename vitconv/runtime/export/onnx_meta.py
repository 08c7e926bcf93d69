"""ONNX export of a model larger than memory: traced without weights, weights streamed from
the checkpoint, proved block by block (issue 33).

The whole-model path (:func:`vitconv.runtime.export.onnx.export_onnx`) traces a module holding every
weight, lets onnxscript's optimizer fold constants, and runs the written file in one
onnxruntime session: three copies of a 25.8 GB model do not fit a 24 GB machine. Here:

* **Trace.** The canonical model is built on the ``meta`` device (no weight in memory),
  traced by ``torch.export`` and converted with ``torch.onnx.export(..., optimize=False)``:
  its initializers are named as the state dict (``cls_token``, ``blocks.0.attn.qkv.weight``).
  Each becomes a *placeholder* (name, type, shape, no value).
* **Optimise.** onnxscript's optimizer runs on the graph with placeholders: it cannot fold
  what has no value, and everything else it does (constants, shape arithmetic, CSE, its
  rewrite rules) happens as on the whole model. What it would have folded from the weights,
  :func:`fold_weights` folds lazily with the optimizer's own decision rules (``input_size_limit``
  8192 elements, ``Transpose`` of a single-use weight always, ``output_size_limit``): the
  folded nodes leave the graph and their output becomes a placeholder whose *recipe* (the
  nodes, the small constants they read, the weights they start from) is evaluated with
  ``onnx.reference`` (the evaluator the optimizer folds with) when that weight is written.
  On the small models of ``tests/test_export_streamed.py`` the graph is then node for node the
  whole-model graph (values renamed) and onnxruntime's outputs are equal to the bit.
* **Write.** :func:`vitconv.runtime.export.onnx_stream.write` streams each weight, read from the
  checkpoint one tensor at a time (:class:`LazyWeight`), in its placeholder's type.
* **Prove.** :func:`block_parity` cuts the written graph at the block boundaries (the values a
  ``blocks.i`` name scope hands to the next scope), runs each part in its own onnxruntime
  session reading its weights from the same file, chains the activations, and compares each
  block's output with :func:`vitconv.conversion.loading.forward_stages_streamed`. Every node and every
  weight of the file is in some part, so every byte written is run.

Where the file can differ from the whole-model export's: initializer names of small constants
(the ``val_N`` numbering), and two weights with equal bytes, which onnx_ir's initializer
deduplication merges in the whole model and cannot see here (placeholders have no bytes): one
more initializer, the same outputs to the bit (``tests/test_export_streamed.py``).

Memory (B/16, 346 MB of float32 weights, ``/usr/bin/time`` peak RSS of ``vitconv export``):
whole model 0.84 GB; streamed, one block a session 0.69 GB, all twelve in one 0.94 GB. About
0.45 GB of it is the imports and the trace; the rest scales with one part's weights, not the
model's.
"""

from __future__ import annotations

import ast
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np

from vitconv.config import parameter_shapes
from vitconv.errors import BadInputError, VerificationError
from vitconv.formats.atomic import atomic_files
from vitconv.runtime.export import onnx_stream
from vitconv.runtime.export.common import trim, FP32_ATOL, ExportResult, Timer, compare_output, raise_if_failed
from vitconv.runtime.export.onnx import INPUT_NAME, OUTPUT_NAME, dynamic_shapes, example_input, quiet_exporter, to_fp16
from vitconv.lazy import lazy_module
from vitconv.verification.compare import compare, judge_rounded_output, seeded_nchw

canonical_model = lazy_module("vitconv.model")  # torch

#: onnxscript's constant-folding limits (``_constant_folding.DEFAULT_CONSTANT_FOLD_*``): the
#: whole-model export folds with these, so the lazy folding follows the same rules.
FOLD_INPUT_LIMIT = 8192
FOLD_OUTPUT_LIMIT = 512 * 512
_ALWAYS_FOLD = {"Transpose"}  # folded whatever its size when the weight has one consumer
_NEVER_FOLD = {"ConstantOfShape", "DequantizeLinear", "DynamicQuantizeLinear", "QuantizeLinear",
               "RandomUniform", "RandomNormal", "RandomUniformLike", "RandomNormalLike", "Multinomial"}
_SCOPES = "pkg.torch.onnx.name_scopes"


@dataclass
class Recipe:
    """How one placeholder's data is made: ``sources`` (checkpoint tensor names, the graph's
    original initializers), then ``nodes`` (serialised ``NodeProto``, in order) reading them and
    the small constant initializers ``constants``; ``output``: the value written."""

    output: str
    sources: List[str]
    nodes: List[object] = field(default_factory=list)
    constants: List[object] = field(default_factory=list)
    opsets: Dict[str, int] = field(default_factory=dict)

    def evaluate(self, read: Callable[[str], np.ndarray]) -> np.ndarray:
        arrays = {s: read(s) for s in self.sources}
        if not self.nodes:
            return arrays[self.sources[0]]
        import onnx
        from onnx.reference import ReferenceEvaluator

        graph = onnx.helper.make_graph(
            self.nodes, "recipe",
            [onnx.helper.make_tensor_value_info(s, onnx.helper.np_dtype_to_tensor_dtype(a.dtype), a.shape)
             for s, a in arrays.items()],
            [onnx.helper.make_empty_tensor_value_info(self.output)], initializer=self.constants)
        model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid(d, v)
                                                              for d, v in self.opsets.items()])
        out = ReferenceEvaluator(model).run([self.output], arrays)[0]
        return np.asarray(out)


class LazyWeight:
    """A placeholder's data, made when :func:`~vitconv.runtime.export.onnx_stream.write` asks
    (``numpy()``): its recipe's checkpoint tensors read one at a time by ``read``."""

    def __init__(self, recipe: Recipe, read: Callable[[str], np.ndarray]):
        self.recipe, self.read = recipe, read

    def numpy(self) -> np.ndarray:
        return self.recipe.evaluate(self.read)


def trace(cfg, opset: int, batch: Optional[int], dynamic_size: bool):
    """The canonical model for ``cfg``, built on ``meta``, as an onnx_ir model (unoptimised),
    every initializer a placeholder (``const_value`` None). Refuses a graph constant that is no
    checkpoint tensor: computed on the CPU at trace time (a relative-position index, a resize
    matrix), on ``meta`` it has no value to write."""
    import torch

    with torch.device("meta"):
        model = canonical_model.VisionTransformer(cfg).eval()
    if any(isinstance(m, canonical_model.StdConv2d) for m in model.modules()):
        raise BadInputError("the streamed ONNX export does not fold the hybrid stem's weight "
                            "standardisation; export a hybrid whole (it fits: the stem is small)")
    x = example_input(cfg, batch).to("meta")
    # as export_onnx calls it (the same FX names, the dynamic dims named as declared), unoptimised
    with quiet_exporter(), torch.no_grad():
        onnx_program = torch.onnx.export(
            model, (x,), dynamo=True, opset_version=opset, optimize=False, input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME], dynamic_shapes=dynamic_shapes(cfg.total_stride, batch, dynamic_size))
    ir_model = onnx_program.model
    names = set(parameter_shapes(cfg))
    for name, value in ir_model.graph.initializers.items():
        if name not in names:
            raise BadInputError(f"streamed ONNX export: graph constant {name!r} is no checkpoint tensor "
                                "(computed at trace time, it has no value on the meta device)")
        value.const_value = None
    return ir_model


def _size(value) -> Optional[int]:
    shape = value.shape
    if shape is None or not all(isinstance(d, int) for d in shape):
        return None
    return math.prod(shape)


def fold_weights(model) -> Dict[str, Recipe]:
    """Fold, without values, what onnxscript's constant folder folds from the weights (see the
    module docstring); returns each placeholder's :class:`Recipe` (plain weights: no nodes).
    ``model``: onnx_ir, optimised, with placeholders (initializers without ``const_value``)."""
    import onnx_ir as ir

    graph = model.graph
    lazy: Dict[object, Recipe] = {}  # ir.Value -> recipe
    for value in graph.initializers.values():
        if value.const_value is None:
            lazy[value] = Recipe(value.name, [value.name])
    opsets = dict(model.opset_imports)
    folded: List[object] = []
    for node in list(graph):
        inputs = [v for v in node.inputs if v is not None]
        if (node.domain not in ("", "ai.onnx") or node.op_type in _NEVER_FOLD or not inputs
                or not any(v in lazy for v in inputs)
                or not all(v in lazy or (v.const_value is not None and not v.is_graph_input()) for v in inputs)
                or any(a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for a in node.attributes.values())):
            continue
        sizes = [(_size(v) if v in lazy else v.const_value.size) for v in inputs]
        outs = list(node.outputs)
        if None in sizes or any(_size(o) is None for o in outs):
            continue
        large = [s > FOLD_INPUT_LIMIT for s in sizes]
        if any(large) and not (node.op_type in _ALWAYS_FOLD
                               and all(len(v.uses()) == 1 for v, big in zip(inputs, large) if big)):
            continue
        out_size = sum(_size(o) for o in outs)
        if out_size > FOLD_OUTPUT_LIMIT and out_size - sum(s for v, s in zip(inputs, sizes) if len(v.uses()) == 1) > 0:
            continue
        sources, nodes, constants = [], [], []
        for v in inputs:
            if v in lazy:
                r = lazy[v]
                sources += [s for s in r.sources if s not in sources]
                nodes += [n for n in r.nodes if n not in nodes]
                constants += [c for c in r.constants if c not in constants]
            else:
                t = ir.serde.serialize_tensor(v.const_value)
                t.name = v.name
                if all(c.name != t.name for c in constants):
                    constants.append(t)
        nodes.append(ir.serde.serialize_node(node))
        for o in outs:
            lazy[o] = Recipe(o.name, sources, nodes, constants, opsets)
        folded.append(node)
    # the folded values the rest of the graph reads become placeholders
    recipes: Dict[str, Recipe] = {}
    keep = set(folded)
    for value, recipe in lazy.items():
        used = value.is_graph_output() or any(n not in keep for n, _ in value.uses())
        if not used:
            continue
        recipes[value.name] = recipe
    for node in reversed(folded):
        for o in node.outputs:
            if o.name in recipes:
                new = ir.Value(name=o.name, shape=o.shape, type=ir.TensorType(o.dtype))
                o.replace_all_uses_with(new)
                new.const_value = ir.tensor(np.zeros(0, np.float32))  # onnx_ir registers valued ones only
                graph.register_initializer(new)
                new.const_value = None
        graph.remove(node, safe=True)
    for name in [n for n, v in graph.initializers.items()
                 if (v.const_value is None and n not in recipes) or not (v.uses() or v.is_graph_output())]:
        graph.initializers.pop(name)  # weights folded away, and constants only folded nodes read
    return recipes


def skeleton(model, recipes: Dict[str, Recipe], read: Callable[[str], np.ndarray]):
    """The optimised, folded onnx_ir ``model`` as an :class:`~vitconv.runtime.export.onnx_stream.Skeleton`
    whose weights are :class:`LazyWeight` (read from the checkpoint as they are written).
    Placeholders of fewer than :data:`~vitconv.runtime.export.onnx_stream.WEIGHT_BYTES` are made now
    and stay in the skeleton, as the whole-model path keeps them."""
    import onnx
    import onnx_ir as ir

    values = [v for v in model.graph.initializers.values() if v.const_value is None]
    for v in values:
        model.graph.initializers.pop(v.name)
    proto = ir.serde.serialize_model(model)
    del proto.graph.value_info[:]
    weights = {}
    for v in values:
        dtype = int(v.dtype)
        itemsize = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(dtype)).itemsize
        lazy = LazyWeight(recipes[v.name], read)
        if _size(v) * itemsize >= onnx_stream.WEIGHT_BYTES:
            tensor = onnx.TensorProto(name=v.name, data_type=dtype, dims=list(v.shape))
            onnx_stream._locate(tensor, onnx_stream._PLACEHOLDER)
            weights[v.name] = lazy
        else:
            tensor = onnx.numpy_helper.from_array(np.ascontiguousarray(lazy.numpy()), v.name)
        proto.graph.initializer.append(tensor)
    return onnx_stream.Skeleton(proto, weights)


def graph(cfg, opset: int, batch: Optional[int], dynamic_size: bool):
    """Trace (:func:`trace`), optimise with onnxscript's optimizer (what the whole-model export
    runs), fold the weights lazily (:func:`fold_weights`): ``(onnx_ir model, recipes)``."""
    import onnxscript.optimizer

    model = trace(cfg, opset, batch, dynamic_size)
    log = logging.getLogger("onnx_ir")  # "skipped deduplication of initializer ...: no constant value"
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        onnxscript.optimizer.optimize_ir(model)
    finally:
        log.setLevel(level)
    recipes = fold_weights(model)
    model.graph.sort()
    return model, recipes


# --------------------------------------------------------------------------- block-by-block parity
def _block(node) -> Optional[int]:
    """The block a node was traced in (its name scope ``blocks.i``), or None."""
    scopes = node.metadata_props.get(_SCOPES) if hasattr(node, "metadata_props") else None
    if scopes is None:
        return None
    if isinstance(scopes, str):
        try:
            scopes = ast.literal_eval(scopes)
        except (ValueError, SyntaxError):
            return None
    for s in scopes:
        if isinstance(s, str) and s.startswith("blocks.") and s[7:].isdigit():
            return int(s[7:])
    return None


@dataclass
class Boundaries:
    """Where the graph is cut: ``outputs[i]``, the residual stream after block i (the float
    ``(batch, tokens, width)`` value a ``blocks.i`` node makes for a node outside the block);
    ``cross[i]``, every value block i makes that a node outside it reads (its output, and the
    shape values onnxscript's common-subexpression pass left in the first block that computed
    them and later blocks share); ``users[name]``: the first block (``depth`` for the head)
    reading each."""

    outputs: List[str]
    cross: List[List[str]]
    users: Dict[str, int]
    #: ``ValueInfoProto`` of each cut value (type and shape, symbolic dims kept), for the cut
    infos: List[object] = field(default_factory=list)


def _blocks(model) -> Dict[int, Optional[int]]:
    """Each node's block (by ``id``): its name scope (:func:`_block`); for a node the optimizer
    made with no scope at all (the ``Split`` a SwiGLU's ``chunk`` folds to), the block every value
    it reads comes from, where that is one block. Nodes come in topological order."""
    where: Dict[int, Optional[int]] = {}
    for node in model.graph:
        i = _block(node)
        if i is None and not (hasattr(node, "metadata_props") and node.metadata_props.get(_SCOPES)):
            made = {where.get(id(v.producer())) for v in node.inputs if v is not None and v.producer() is not None}
            made.discard(None)
            i = made.pop() if len(made) == 1 else None
        where[id(node)] = i
    return where


def block_outputs(model, depth: int) -> Boundaries:
    """The :class:`Boundaries` of the onnx_ir ``model``, read off its nodes' name scopes."""
    cross: List[List[str]] = [[] for _ in range(depth)]
    outputs: List[List[str]] = [[] for _ in range(depth)]
    users: Dict[str, int] = {}
    where = _blocks(model)
    for node in model.graph:
        i = where[id(node)]
        if i is None:
            continue
        for o in node.outputs:
            later = [where.get(id(u)) for u, _ in o.uses() if where.get(id(u)) != i]
            if o.is_graph_output() or later:
                cross[i].append(o.name)
                users[o.name] = min(depth if b is None else b for b in later) if later else depth
                shape = o.shape
                if o.dtype is not None and o.dtype.is_floating_point() and shape is not None and len(shape) == 3:
                    outputs[i].append(o.name)
    if any(len(v) != 1 for v in outputs):
        raise VerificationError(f"streamed ONNX export: cannot cut the graph at block boundaries ({outputs})")
    import onnx_ir as ir

    infos = [ir.serde.serialize_value(v) for node in model.graph for v in node.outputs if v.name in users]
    return Boundaries([v[0] for v in outputs], cross, users, infos)


@dataclass
class Part:
    """One piece of the written graph, run in its own session: ``blocks`` (indices whose outputs
    it ends with; empty for the head part) and its output names."""

    proto: object
    blocks: List[int]
    outputs: List[str]


def cut(light, bounds: Boundaries, blocks_per_part: int) -> List[Part]:
    """``light`` (the written file's description: every weight external data) cut into parts
    of ``blocks_per_part`` blocks, the first with the embedding, a last one from the last
    block's output to the logits. Each part reads ``pixel_values`` (the shapes, positions and
    rotary angles derived from the input grid are recomputed in it) and what earlier blocks
    hand to its blocks (:class:`Boundaries`). Raises when the parts miss any node or weight of
    ``light``."""
    import onnx
    from onnx.utils import Extractor

    typed = onnx.ModelProto()  # the graph with its cut values typed (onnx's shape inference loses them)
    typed.CopyFrom(light)
    known = {v.name for v in typed.graph.value_info}  # (a float16 graph's: its converter's)
    typed.graph.value_info.extend(v for v in bounds.infos if v.name not in known)
    ex = Extractor(typed)
    depth = len(bounds.outputs)
    parts: List[Part] = []
    starts = list(range(0, depth, blocks_per_part)) + [depth]
    for start, stop in zip(starts, starts[1:] + [None]):
        idx = list(range(start, depth if stop is None else stop))
        inputs = [INPUT_NAME] + [n for i in range(start) for n in bounds.cross[i] if bounds.users[n] >= start]
        if stop is None:
            outs = [OUTPUT_NAME]
        else:
            outs = [bounds.outputs[i] for i in idx]
            outs += [n for i in idx for n in bounds.cross[i] if bounds.users[n] >= stop and n not in outs]
        parts.append(Part(ex.extract_model(inputs, outs), idx, outs))
    made = {o for p in parts for n in p.proto.graph.node for o in n.output}
    read = {t.name for p in parts for t in p.proto.graph.initializer}
    missed = [n.op_type + ":" + n.output[0] for n in light.graph.node if not set(n.output) <= made]
    missed += [t.name for t in light.graph.initializer if t.name not in read]
    if missed:
        raise VerificationError(f"streamed ONNX export: the block parts miss {missed[:5]}")
    for p in parts:
        del p.proto.graph.value_info[:]
    return parts


def block_parity(light, folder: Path, bounds: Boundaries, stages: Callable[[int, int], Dict[str, np.ndarray]],
                 checks, in_chans: int, blocks_per_part: int, fp16: bool, atol: float):
    """Run the written model part by part (:func:`cut`), each part in its own onnxruntime
    session reading its weights from the written file (``folder``), the activations chained,
    on each check's seeded input. Each block's output is compared with the canonical model's
    (``stages(batch, size)``: :func:`~vitconv.conversion.loading.forward_stages_streamed`'s), within
    ``atol * max(1, rms(want))`` (:func:`vitconv.verification.compare.compare`, the rule of every
    stage ``verify`` compares); raises :class:`VerificationError` naming the first block past
    it (float16: the cosine of the whole activation at least ``FP16_MIN_COSINE``, as the
    logits': :func:`~vitconv.verification.compare.judge_rounded_output`). Returns the logits'
    :class:`~vitconv.runtime.export.common.Parity` per check and each block's ``(index, max|diff|,
    rms(want))``."""
    import onnx
    import onnxruntime as ort

    parts = cut(light, bounds, blocks_per_part)
    paths = []
    for j, p in enumerate(parts):
        paths.append(folder / f".part{j}.onnx")
        onnx.save_model(p.proto, os.fspath(paths[-1]))
    del parts[:]  # the part protos: weights are external, these are light, but not needed again
    xs = {(c.batch, c.size): seeded_nchw(c.batch, c.size, in_chans) for c in checks}
    acts: Dict[Tuple[int, int], Dict[str, np.ndarray]] = {k: {INPUT_NAME: x} for k, x in xs.items()}
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    # without its memory arena: onnxruntime keeps an arena's memory after the session goes
    # (measured on B/16, one block a part: resident memory grew by a block's weights each part)
    opts.enable_cpu_mem_arena = False
    worst: List[Tuple[int, float, float]] = []
    try:
        for path in paths:
            sess = ort.InferenceSession(os.fspath(path), opts, providers=["CPUExecutionProvider"])
            names = [i.name for i in sess.get_inputs()]
            outs = [o.name for o in sess.get_outputs()]
            for key, env in acts.items():
                got = sess.run(outs, {n: env[n] for n in names})
                env.update(zip(outs, got))
            del sess
            trim()  # the part's weights go back to the system before the next part loads
    finally:
        for path in paths:
            path.unlink(missing_ok=True)
    parity = []
    for (batch, size), env in acts.items():
        want = stages(batch, size)
        trim()
        for i, name in enumerate(bounds.outputs):
            ref, got = want[f"blocks.{i}.mlp"], env[name]
            if fp16:  # float16 weights: the direction of the whole activation, as the logits' check
                c = judge_rounded_output(got, ref, rows=False)
                figure = f"cosine {c.cosine:.6f} (max|diff| {c.max_abs:.3g})"
            else:
                c = compare(got, ref, atol)
                figure = f"max|diff| {c.max_abs:.3g} > {c.bound:.3g}"
            if not c.ok:
                raise VerificationError(
                    f"streamed ONNX export: block {i} (blocks.{i}) output disagrees with the canonical model "
                    f"at b{batch} {size}px: {figure}; nothing written")
            worst.append((i, c.max_abs, c.rms))
        parity.append(compare_output(want["logits"] if "logits" in want else want["head_input"], env[OUTPUT_NAME],
                                     batch, size, fp16, atol))
    return parity, worst


# --------------------------------------------------------------------------- the export
def export_onnx_streamed(open_ckpt, path, stages, checks, *, opset: int, batch: Optional[int] = None,
                         dynamic_size: bool = False, fp16: bool = False, meta: Optional[Dict[str, str]] = None,
                         blocks_per_part: int = 2, atol: Optional[float] = None):
    """Write ``open_ckpt()``'s model to ``path`` with no weight in memory but the one being
    written, and prove it block by block (:func:`block_parity`) before moving it into place.
    ``stages(batch, size)``: the canonical model's stages on that check's seeded input.
    Returns an :class:`~vitconv.runtime.export.common.ExportResult`."""
    import onnx

    with open_ckpt() as ckpt:
        cfg = ckpt.config
    t0 = time.perf_counter()
    model, recipes = graph(cfg, opset, batch, dynamic_size)
    bounds = block_outputs(model, cfg.depth)
    with open_ckpt() as ckpt:
        def read(name: str) -> np.ndarray:
            return dict(ckpt.tensors(order=[name]))[name]

        skel = skeleton(model, recipes, read)
        del model
        onnx.helper.set_model_props(skel.proto, meta or {})
        skel.proto.doc_string = "vitconv export: canonical ViT, pixel_values (NCHW float32) -> logits"
        if fp16:
            skel.proto = to_fp16(skel.proto)
        large = skel.is_large()
        final = Path(path)
        data = final.with_name(final.name + ".data")
        files = [final, data] if large else [final]
        with atomic_files(files) as folder:
            tmp = folder / final.name
            light = onnx_stream.write(skel, tmp, folder / data.name if large else None)
            del skel
            export_s = time.perf_counter() - t0
            with Timer() as t_verify:
                checked = folder / f".{final.name}.check"  # the light description: no data parsed
                onnx.save_model(light, os.fspath(checked))
                onnx.checker.check_model(os.fspath(checked), full_check=True)
                checked.unlink()
                parity, worst = block_parity(light, folder, bounds, stages, checks, cfg.in_chans,
                                             blocks_per_part, fp16, FP32_ATOL if atol is None else atol)
            top = max(worst, key=lambda w: w[1] / max(1.0, w[2])) if worst else None
            notes = [f"traced on the meta device, weights streamed from the checkpoint; onnx.checker "
                     f"full_check passed; proved block by block ({blocks_per_part} a session), opset {opset}, "
                     "onnxruntime CPU"]
            if top:
                notes.append(f"worst block output: block {top[0]} max|diff| {top[1]:.2e} (rms(want) {top[2]:.3g})")
            if large:
                notes.append(f"tensors in {data.name} (model above protobuf's 2 GB limit)")
            result = ExportResult("onnx" + (" fp16" if fp16 else "") + " (streamed)", files, export_s,
                                  t_verify.s, parity, notes, fp16)
            raise_if_failed(result, final)
    return result
