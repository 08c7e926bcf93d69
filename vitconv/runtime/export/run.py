"""``vitconv export``'s driver: :func:`run_export` runs an :class:`ExportPlan`, each artifact
proved in its runtime before it is renamed into place (see :mod:`vitconv.runtime.export`)."""

from __future__ import annotations

import gc
import math
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from vitconv.config import ViTConfig, parameter_shapes
from vitconv.errors import BadInputError, VerificationError
from vitconv.formats.atomic import check_writable, refuse_clobber
from vitconv.formats.base import sha256_file
from vitconv.formats.safetensors_stream import DEFAULT_SHARD_BYTES
from vitconv.conversion.pipeline import RESIZE_WORDS, open_checkpoint
from vitconv.conversion.options import ConvertOptions, ReadOptions
from vitconv.runtime.export.common import Check, ExportResult, Parity, PathLike, Reference, check_plan, export_ready
from vitconv.runtime.export.onnx import DEFAULT_OPSET, export_metadata, export_onnx
from vitconv.runtime.export.onnx_meta import export_onnx_streamed
from vitconv.runtime.export.pt2 import export_pt2
from vitconv.runtime.export.safetensors import export_safetensors
from vitconv.runtime.export.torchscript import export_torchscript
from vitconv.lazy import lazy_module
from vitconv.verification.compare import seeded_nchw

loading = lazy_module("vitconv.conversion.loading")  # torch

__all__ = ["ExportPlan", "ExportResult", "Parity", "Check", "run_export", "default_output", "check_plan",
           "export_ready"]


@dataclass
class ExportPlan:
    """Targets and options of one ``vitconv export`` run (``None`` target: not asked)."""

    onnx: Optional[Path] = None
    torchscript: Optional[Path] = None
    pt2: Optional[Path] = None
    safetensors: Optional[Path] = None
    opset: int = DEFAULT_OPSET
    batch: Optional[int] = None
    dynamic_size: bool = False
    fp16: bool = False
    image_size: Optional[int] = None
    shard_bytes: int = DEFAULT_SHARD_BYTES
    aoti: bool = True
    labels: Union[str, Sequence[str], None] = None  # class names (vitconv.runtime.labels.load_labels)
    #: What a bare state dict cannot record: config fields (``--set``) and ``arch`` (``--arch``,
    #: :mod:`vitconv.archs`), as :func:`vitconv.conversion.pipeline.open_checkpoint` takes them.
    overrides: Optional[Dict[str, object]] = None
    #: ONNX traced on the meta device, weights streamed from the checkpoint, proved block by
    #: block (:mod:`vitconv.runtime.export.onnx_meta`): None (default) when the whole model would not fit
    #: (:func:`whole_model_fits`) or the environment says ``VITCONV_ONNX_STREAMED=1``; True / False force it.
    streamed: Optional[bool] = None
    #: Blocks per onnxruntime session of the block-by-block proof (None: ``VITCONV_ONNX_BLOCKS``, else
    #: as many as an eighth of the memory holds: :func:`blocks_per_part`).
    blocks_per_part: Optional[int] = None

    def reading(self) -> ReadOptions:
        """How every target reads the source: at ``image_size``, with ``labels`` and ``overrides``."""
        return ReadOptions(image_size=self.image_size, labels=self.labels, overrides=self.overrides or {})


#: Peak memory of ``vitconv export`` as a multiple of the model's float32 weight bytes: every
#: target is proved against the whole model in memory, and the ONNX, TorchScript and .pt2
#: exporters trace it whole (BENCHMARKS.md, "Memory": 1.16-1.5x from B/16 to g/14).
#: ``vitconv convert`` and ``vitconv verify`` run block by block and have no such bound.
WHOLE_MODEL_PEAK = 1.5


def physical_memory() -> int:
    """This machine's physical memory in bytes (0 where the platform does not say)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 0


def float32_weight_bytes(cfg: ViTConfig) -> int:
    return 4 * sum(math.prod(s) for s in parameter_shapes(cfg).values())


def whole_model_fits(cfg: ViTConfig, memory: Optional[int] = None) -> bool:
    """Whether the whole-model export's peak (:data:`WHOLE_MODEL_PEAK` x the float32 weights)
    fits this machine's memory (True where the platform does not say)."""
    memory = physical_memory() if memory is None else memory
    return not (memory and WHOLE_MODEL_PEAK * float32_weight_bytes(cfg) > memory)


def refuse_whole_model_beyond_memory(cfg: ViTConfig, src: PathLike, memory: Optional[int] = None) -> None:
    """Refuse, before anything is read, an export whose traced model would not fit in this
    machine's memory: it would swap for hours or be killed, leaving the user nothing to go on.
    (ONNX alone then goes the streamed way: :mod:`vitconv.runtime.export.onnx_meta`.)"""
    memory = physical_memory() if memory is None else memory
    weights = float32_weight_bytes(cfg)
    need = WHOLE_MODEL_PEAK * weights
    if not whole_model_fits(cfg, memory):
        raise BadInputError(
            f"export holds the whole model in memory: about {need / 1e9:.1f} GB ({WHOLE_MODEL_PEAK}x its "
            f"{weights / 1e9:.1f} GB of float32 weights), and this machine has {memory / 1e9:.1f} GB; "
            "vitconv convert (safetensors, .pt, every layout) and vitconv verify run block by block "
            "at any size; --onnx alone is exported block by block", src)


def streamed_wanted(plan: ExportPlan, cfg: ViTConfig) -> bool:
    """Whether ``plan``'s ONNX export goes the streamed way (see :attr:`ExportPlan.streamed`)."""
    if plan.streamed is not None:
        return plan.streamed
    if os.environ.get("VITCONV_ONNX_STREAMED", "") == "1":
        return True
    alone = not (plan.torchscript or plan.pt2 or plan.safetensors)  # others need the whole model
    return alone and not whole_model_fits(cfg)


def blocks_per_part(plan: ExportPlan, cfg: ViTConfig) -> int:
    """Blocks per session of the block-by-block proof: the plan's, ``VITCONV_ONNX_BLOCKS``, or
    as many blocks as an eighth of the physical memory holds (onnxruntime holds a part's
    weights and may pre-pack a copy of each matrix; the machine's other users keep the rest)."""
    if plan.blocks_per_part:
        return plan.blocks_per_part
    if os.environ.get("VITCONV_ONNX_BLOCKS"):
        return max(1, int(os.environ["VITCONV_ONNX_BLOCKS"]))
    block = 4 * sum(math.prod(s) for n, s in parameter_shapes(cfg).items() if n.startswith("blocks.0."))
    memory = physical_memory() or 8 * 1024**3
    return max(1, min(cfg.depth, int(memory / 8 // max(block, 1))))


def streamed_stages(src: PathLike, plan: ExportPlan, native: int):
    """``stages(batch, size)``: the canonical model's stages on that check's seeded input, run
    block by block from the checkpoint (:func:`~vitconv.conversion.loading.forward_stages_streamed`),
    converted at ``size`` where it is not the native one (as :func:`make_reference`)."""
    import torch

    def stages(batch: int, size: int) -> Dict[str, np.ndarray]:
        with open_checkpoint(src, replace(plan.reading(), image_size=plan.image_size if size == native else size)
                             ) as ckpt:
            x = torch.from_numpy(seeded_nchw(batch, size, ckpt.config.in_chans))
            return {k: v.numpy() for k, v in loading.forward_stages_streamed(ckpt, x).items()}

    return stages


def run_export_streamed(src: PathLike, plan: ExportPlan, cfg: ViTConfig, usage, weights: PathLike,
                        progress: Callable[[str], None]) -> List[ExportResult]:
    """The ONNX target of a model exported without holding it (:mod:`vitconv.runtime.export.onnx_meta`)."""
    if plan.torchscript or plan.pt2 or plan.safetensors:
        raise BadInputError("the streamed ONNX export (a model larger than memory, or VITCONV_ONNX_STREAMED=1) "
                            "writes --onnx alone; convert to safetensors with vitconv convert", src)
    checks = check_plan(cfg.image_size, cfg.total_stride, plan.batch, plan.dynamic_size)
    meta = export_metadata(cfg, usage, opset=plan.opset, batch=plan.batch, dynamic_size=plan.dynamic_size,
                           fp16=plan.fp16, source_sha256=sha256_file(weights), source=src)
    k = blocks_per_part(plan, cfg)
    progress(f"onnx -> {plan.onnx} (streamed: traced on the meta device, proved {k} block(s) at a time)")

    def open_ckpt():
        return open_checkpoint(src, plan.reading())

    result = export_onnx_streamed(open_ckpt, plan.onnx, streamed_stages(src, plan, cfg.image_size), checks,
                                  opset=plan.opset, batch=plan.batch, dynamic_size=plan.dynamic_size,
                                  fp16=plan.fp16, meta=meta, blocks_per_part=k)
    return _say_resize([result], plan, cfg)


def _say_resize(results: List[ExportResult], plan: ExportPlan, cfg: ViTConfig) -> List[ExportResult]:
    """A --dynamic-size artifact's note: how it resizes its position table at other sizes, in the
    words of the family whose way it is (a model whose own library never resizes, as transformers'
    AIMv2 with a learned table, thus says whose way it follows)."""
    if plan.dynamic_size and cfg.abs_pos_embed:
        for r in results:
            if r.kind != "safetensors":
                r.notes.append(f"position table at other sizes: {RESIZE_WORDS[cfg.pos_resize]}")
    return results


def default_output(src: PathLike, kind: str) -> Path:
    """``SRC`` stem + the artifact's suffix, beside ``SRC``."""
    suffix = {"onnx": ".onnx", "torchscript": ".torchscript.pt", "pt2": ".pt2",
              "safetensors": ".safetensors"}[kind]
    p = Path(src)
    return p.with_name(p.stem + suffix)


def make_reference(src: PathLike, model, image_size: int, checks: Sequence[Check]) -> Reference:
    """PyTorch logits on each check's seeded input, computed now. At the model's own
    resolution they are ``model``'s; at any other resolution the model's *converted* at that
    size (``vitconv.load(src, image_size=R)``, Google's scipy zoom), so dynamic-resolution
    exports are held to what ``npz2pt --image-size`` computes, not to the on-the-fly resize
    they embed. Each resized model is released before the next is loaded."""
    import torch

    outputs: Dict[Tuple[int, int], np.ndarray] = {}
    for size in dict.fromkeys(c.size for c in checks):
        m = model if size == image_size else loading.load(src, image_size=size)
        with torch.no_grad():
            for c in checks:
                if c.size == size:
                    x = torch.from_numpy(seeded_nchw(c.batch, size, model.config.in_chans))
                    outputs[c.batch, size] = m(x).numpy()
        del m

    def reference(batch: int, size: int) -> np.ndarray:
        return outputs[batch, size]

    return reference


def run_export(src: PathLike, plan: ExportPlan,
               progress: Optional[Callable[[str], None]] = None) -> List[ExportResult]:
    """Load ``src`` (anything :func:`vitconv.load` reads), write each requested artifact and
    verify it in its runtime. Raises :class:`VerificationError` after all targets ran if any
    disagreed (those were not written); its ``results`` attribute holds every target's figures."""
    if plan.fp16 and (plan.torchscript or plan.pt2):
        raise BadInputError("--fp16 applies to --onnx and --safetensors only (TorchScript and "
                            ".pt2 are written in float32)", src)
    if plan.batch is not None and plan.batch <= 0:
        raise BadInputError(f"--batch must be positive, got {plan.batch}", src)
    outputs = [out for out in (plan.onnx, plan.torchscript, plan.pt2, plan.safetensors) if out]
    refuse_clobber(outputs, [src])
    for out in outputs:
        check_writable(out)  # a read-only or missing directory: said before minutes of export
    with open_checkpoint(src, plan.reading()) as ckpt:
        refuse_clobber(outputs, ckpt.source.files())
        if plan.dynamic_size and ckpt.config.pos_resize == "dinov2":
            raise BadInputError("--dynamic-size: the original DINOv2 resizes its position table with "
                                "scale_factor (g + 0.1) / M, which ONNX and torch.export cannot follow for "
                                "symbolic sizes; export at a fixed resolution (--image-size N)", src)
        streamed = bool(plan.onnx) and streamed_wanted(plan, ckpt.config)
        if streamed:  # no model built: the exporter reads the checkpoint again, a weight at a time
            cfg, usage, weights = ckpt.config, ckpt.usage, ckpt.source.files()[0]
        else:
            refuse_whole_model_beyond_memory(ckpt.config, src)
            model, usage = loading.build_model(ckpt.config, ckpt.state_dict()), ckpt.usage
            weights = ckpt.source.files()[0]  # a model directory's weights file
    if streamed:
        return run_export_streamed(src, plan, cfg, usage, weights, progress or (lambda s: None))
    cfg = model.config
    say = progress or (lambda s: None)
    checks = check_plan(cfg.image_size, cfg.total_stride, plan.batch, plan.dynamic_size)
    reference = make_reference(src, model, cfg.image_size, checks)
    results: List[ExportResult] = []
    failures: List[VerificationError] = []
    source_sha = sha256_file(weights)

    def attempt(fn) -> None:
        try:
            results.append(fn())
        except VerificationError as e:
            failures.append(e)
            results.extend(getattr(e, "results", []))

    # The last target that runs the model is handed it (export.common.take), and frees its
    # weights once its file is written, before loading the file back; the safetensors target
    # converts from the source again, so it runs after the model is gone.
    users = [k for k in ("torchscript", "pt2", "onnx") if getattr(plan, k)]
    owned = [model]
    del model

    def given(kind: str):
        return owned if kind == users[-1] else owned[0]

    if plan.torchscript:
        say(f"torchscript -> {plan.torchscript}")
        attempt(lambda: export_torchscript(given("torchscript"), plan.torchscript, reference, checks,
                                           batch=plan.batch, usage=usage))
    if plan.pt2:
        say(f"pt2 -> {plan.pt2}" + (" (AOTInductor compile: minutes on a small CPU)" if plan.aoti else ""))
        attempt(lambda: export_pt2(given("pt2"), plan.pt2, reference, checks, batch=plan.batch,
                                   dynamic_size=plan.dynamic_size, aoti=plan.aoti))
    if plan.onnx:
        say(f"onnx -> {plan.onnx}")
        attempt(lambda: export_onnx(given("onnx"), plan.onnx, reference, checks, opset=plan.opset,
                                    batch=plan.batch, dynamic_size=plan.dynamic_size,
                                    fp16=plan.fp16, source_sha256=source_sha, source=src,
                                    usage=usage))
    owned.clear()  # (if no target took it)
    gc.collect()
    if plan.safetensors:
        say(f"safetensors -> {plan.safetensors}")
        attempt(lambda: export_safetensors(src, plan.safetensors, reference, checks, ConvertOptions.of(
            plan.reading(), to="canonical", dtype="float16" if plan.fp16 else None, shard_bytes=plan.shard_bytes)))
    if failures:
        err = VerificationError("; ".join(str(f) for f in failures))
        err.results = results  # type: ignore[attr-defined]
        raise err
    return _say_resize(results, plan, cfg)
