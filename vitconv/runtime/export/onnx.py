"""ONNX export through ``torch.onnx.export(..., dynamo=True)``, verified in onnxruntime (CPU).

Why these choices:

* **Exporter.** The dynamo exporter (``torch.export`` underneath) is the supported path in
  torch 2.x; the TorchScript-based one is deprecated. It is handed a batch of
  :data:`~vitconv.runtime.export.EXAMPLE_BATCH` (2): with a batch of 1 as example, ``torch.export``
  may specialise the dimension to the constant 1.
* **Dynamic shapes.** Batch is ``batch_size``; with ``dynamic_size`` height and width are
  declared as ``stride * height`` / ``stride * width`` (a multiple of the model's total
  stride, so the patch grid and the hybrid stem's SAME padding stay exact integers). The
  model resizes its position table with bilinear ``align_corners=True`` whenever the grid is
  symbolic, which is what ``npz2pt --image-size`` computes with scipy's zoom; at the native
  grid the resize is the identity, so nothing size-specific is baked into the graph.
* **Opset.** Default 20, torch 2.13's own default. onnxruntime 1.31 CPU runs 18, 20 and 23
  alike on these models (measured, all within 1e-5 of PyTorch). 18 has no ``Gelu`` op (the
  tanh GELU becomes Pow/Tanh arithmetic); 20 has ``Gelu(approximate='tanh')`` and still
  spells attention as MatMul/Softmax, which every ONNX runtime executes; 23 maps SDPA to the
  fused ``Attention`` op, which only recent runtimes implement. Pass ``--opset 23`` for
  those, ``--opset 18`` for older ones.
* **One file.** Tensors are stored inline (the exporter's default is an external ``.data``
  file) unless the model exceeds protobuf's 2 GB limit. Either way they are written one at a
  time from the module's own tensors (:mod:`~vitconv.runtime.export.onnx_stream`).
* **fp16.** ``onnxruntime.transformers.float16.convert_float_to_float16`` with
  ``keep_io_types`` (float32 in and out) and LayerNormalization, Softmax, reductions, Pow and
  Resize on the block list, so normalisation statistics, attention weights and the position
  table stay float32. It runs on the graph without its weights; each weight is rounded with
  the converter's own function as it is written, so the file is the one the converter would
  give on the whole model, without the whole model's copies.
* **Larger than memory.** :mod:`~vitconv.runtime.export.onnx_meta` writes the same file from a model
  traced on the ``meta`` device, each weight read from the checkpoint as it is written, and
  proves it block by block (``vitconv export --streamed``; the default when the whole model
  would not fit).
* **Metadata.** ``metadata_props`` carry the vitconv config JSON, preprocessing, resolution,
  opset, which axes are dynamic and the source file's sha256.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import warnings
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from vitconv.formats.atomic import atomic_files
from vitconv.runtime.preprocess import Usage
from vitconv.formats.provenance import CONFIG_KEY, Provenance
from vitconv.runtime.export import onnx_stream
from vitconv.runtime.export.common import (EXAMPLE_BATCH, FP32_ATOL, Check, ExportResult, PathLike, Reference, Timer, export_ready,
                     raise_if_failed, release, take, verify)

DEFAULT_OPSET = 20
INPUT_NAME, OUTPUT_NAME = "pixel_values", "logits"
#: Ops kept in float32 in ``--fp16`` exports: normalisation statistics, softmax, reductions,
#: x**3 of the tanh GELU (opset < 20) and the position-table resize; and, whatever their op,
#: the nodes that compute rotary and sin-cos angles (:func:`onnx_stream.geometry_nodes`).
FP16_KEEP_FP32 = ["LayerNormalization", "GroupNormalization", "InstanceNormalization", "Softmax",
                  "ReduceMean", "ReduceSum", "ReduceMax", "ReduceL2", "Pow", "Resize", "Sqrt"]


def dynamic_shapes(stride: int, batch: Optional[int], dynamic_size: bool):
    """``torch.export`` dynamic-shape spec for the single input (``None``: fully static)."""
    from torch.export import Dim

    spec = {}
    if batch is None:
        spec[0] = Dim("batch_size", min=1)
    if dynamic_size:
        spec[2] = stride * Dim("height", min=1)
        spec[3] = stride * Dim("width", min=1)
    return (spec,) if spec else None


def example_input(cfg, batch: Optional[int]):
    import torch

    g = torch.Generator().manual_seed(1)
    return torch.rand(batch or EXAMPLE_BATCH, cfg.in_chans, cfg.image_size, cfg.image_size,
                      generator=g) * 2 - 1


@contextlib.contextmanager
def quiet_exporter():
    """The dynamo exporter prints progress to stdout and warns about torchvision; keep the
    CLI's output to vitconv's own report."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def preprocessing_metadata(usage: Usage) -> Dict[str, str]:
    """ONNX metadata for the graph's users: ``preprocessing`` in words and numbers (NCHW RGB),
    and vitconv's own ``vitconv_preprocessing`` / ``vitconv_labels`` strings, which
    ``vitconv predict`` reads back."""
    p = usage.preprocessing
    meta = {"preprocessing": json.dumps({
        "layout": "NCHW", "channels": "RGB", "scale": "pixels / 255 -> [0, 1]", "mean": list(p.mean),
        "std": list(p.std), "resize": p.resize, "interpolation": p.interpolation, "crop_pct": p.crop_pct,
        "note": p.describe()})}
    meta.update(usage.metadata())
    return meta


def export_metadata(cfg, usage: Optional[Usage], *, opset: int, batch: Optional[int], dynamic_size: bool,
                    fp16: bool, source_sha256: str, source: Optional[PathLike]) -> Dict[str, str]:
    """The ``metadata_props`` of an exported file (see the module docstring)."""
    meta = {
        CONFIG_KEY: cfg.to_json(),
        **preprocessing_metadata(usage or Usage()),
        "image_size": str(cfg.image_size),
        "dynamic_axes": json.dumps({"batch": batch is None, "height_width": dynamic_size,
                                    "size_multiple_of": cfg.total_stride}),
        "precision": "float16 (float32 I/O, norms/softmax/reductions and rotary angles float32)" if fp16 else "float32",
        "opset": str(opset),
        **Provenance(source_sha256=source_sha256).metadata(),
    }
    if source is not None:
        meta["source_file"] = Path(source).name
    return meta


def to_fp16(proto):
    """float32 -> float16 graph with float32 I/O and :data:`FP16_KEEP_FP32` ops kept float32."""
    return onnx_stream.to_fp16(proto, FP16_KEEP_FP32)


def export_onnx(model, path: PathLike, reference: Reference, checks: Sequence[Check], *,
                opset: int = DEFAULT_OPSET, batch: Optional[int] = None,
                dynamic_size: bool = False, fp16: bool = False, source_sha256: str = "",
                source: Optional[PathLike] = None, usage: Optional[Usage] = None,
                atol: Optional[float] = None) -> ExportResult:
    """Export ``model`` to one ``.onnx`` at ``path``, check it with ``onnx.checker``
    (``full_check``), run it in onnxruntime on ``checks`` against ``reference`` and only then
    move it into place. Raises :class:`VerificationError` past tolerance.

    ``model``: the module, or a one-element list that hands it over (:func:`~vitconv.runtime.export.
    common.take`): released once its weights are in the file, before onnxruntime loads it.
    The graph is edited as a skeleton without its weights, which go from the module's tensors
    to disk one at a time (:mod:`~vitconv.runtime.export.onnx_stream`): never a protobuf holding every
    weight, at either precision.

    The checker and onnxruntime read an inline file through its light description
    (:func:`~vitconv.runtime.export.onnx_stream.write`: each weight external data at its offset in the
    file itself), so no message ever holds every weight."""
    import onnx
    import torch

    model, owned = take(model)
    cfg = model.config
    ready = export_ready(model)
    x = example_input(cfg, batch)
    meta = export_metadata(cfg, usage, opset=opset, batch=batch, dynamic_size=dynamic_size, fp16=fp16,
                           source_sha256=source_sha256, source=source)
    with Timer() as t_export:
        with quiet_exporter(), torch.no_grad():
            program = torch.onnx.export(
                ready, (x,), dynamo=True, opset_version=opset, input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_shapes=dynamic_shapes(cfg.total_stride, batch, dynamic_size))
        skel = onnx_stream.skeleton(program.model)  # its weights: the module's own tensors
        del program
        onnx.helper.set_model_props(skel.proto, meta)
        skel.proto.doc_string = "vitconv export: canonical ViT, pixel_values (NCHW float32) -> logits"
        if fp16:
            skel.proto = to_fp16(skel.proto)
    large = skel.is_large()
    notes: List[str] = []
    final = Path(path)
    data = final.with_name(final.name + ".data")
    with atomic_files([final, data] if large else [final]) as folder:  # both appear, or neither
        tmp = folder / final.name
        with Timer() as t_save:
            light = onnx_stream.write(skel, tmp, folder / data.name if large else None)
            del skel
            if large:
                notes.append(f"tensors in {data.name} (model above protobuf's 2 GB limit)")
        # the checker and onnxruntime read the file: the model goes first
        if owned:
            release(ready, model)
        del ready, model
        with Timer() as t_verify:
            checked = tmp
            if not large:  # the inline file's graph, each weight external data in the file itself
                checked = folder / f".{final.name}.check"
                onnx.save_model(light, os.fspath(checked))
            del light
            onnx.checker.check_model(os.fspath(checked), full_check=True)
            notes.append(f"opset {opset}; onnx.checker full_check passed; onnxruntime CPU")
            run = _ort_runner(checked)
            parity = verify(run, reference, checks, cfg.in_chans, fp16=fp16,
                            atol=FP32_ATOL if atol is None else atol)
            del run
        result = ExportResult("onnx" + (" fp16" if fp16 else ""), [final, data] if large else [final],
                              t_export.s + t_save.s,
                              t_verify.s, parity, notes, fp16)
        raise_if_failed(result, final)
    return result


def _ort_runner(path: PathLike):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(os.fspath(path), opts, providers=["CPUExecutionProvider"])
    return lambda x: sess.run([OUTPUT_NAME], {INPUT_NAME: np.ascontiguousarray(x, np.float32)})[0]
