"""TorchScript export by ``torch.jit.trace``, verified with ``torch.jit.load``.

Why trace and not script: the canonical model's activation is chosen by a Python lambda and
its optional parts (class token, stem, pre_logits) are ``None`` or modules, which
``torch.jit.script`` rejects; tracing records the ops actually run. While tracing, tensor
sizes are recorded as graph values, not constants, so the trace follows the input's batch
*and* resolution: the position table is resized from the traced grid size (the same
bilinear ``align_corners=True`` resize as eager and ``npz2pt --image-size``). The
verification proves this on batch sizes and resolutions the trace never saw. TorchScript is
in maintenance in PyTorch (``torch.jit.trace`` warns that it is deprecated); prefer ``.pt2``
or ONNX for new deployments.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Optional, Sequence

from vitconv.formats.atomic import atomic_output, write_in_child
from vitconv.runtime.preprocess import Usage
from vitconv.runtime.runners import TORCHSCRIPT_EXTRA
from vitconv.runtime.export.common import (Check, ExportResult, PathLike, Reference, Timer, export_ready, raise_if_failed, release, take,
                     verify)
from vitconv.runtime.export.onnx import example_input


def export_torchscript(model, path: PathLike, reference: Reference, checks: Sequence[Check], *,
                       batch: Optional[int] = None, usage: Optional[Usage] = None) -> ExportResult:
    """Trace ``model`` (stem folded, see :func:`~vitconv.runtime.export.export_ready`), save it,
    ``torch.jit.load`` it back, verify on ``checks``; renamed into place only if it agrees.
    ``model`` may be handed over (:func:`~vitconv.runtime.export.common.take`): then its weights are
    freed once saved, before the file is loaded back."""
    import torch

    model, owned = take(model)
    cfg = model.config
    ready = export_ready(model)
    x = example_input(cfg, batch)
    with Timer() as t_export, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.no_grad():
            traced = torch.jit.trace(ready, (x,), check_trace=False)
    final = Path(path)
    with atomic_output(final, suffix=".pt") as tmp:
        with Timer() as t_save:
            extra = {TORCHSCRIPT_EXTRA: json.dumps((usage or Usage()).provenance(config=cfg.to_json()).metadata())}
            # streamed to the path, in a child: a failed write aborts the process inside torch
            write_in_child(lambda where: torch.jit.save(traced, where, _extra_files=extra), tmp)
        del traced  # it shares the model's tensors
        if owned:
            release(ready, model)
        del ready, model
        with Timer() as t_verify:
            with warnings.catch_warnings():  # "torch.jit.load is deprecated": known, said above
                warnings.simplefilter("ignore")
                loaded = torch.jit.load(os.fspath(tmp), map_location="cpu").eval()

            def run(a):
                with torch.no_grad():
                    return loaded(torch.from_numpy(a)).numpy()

            parity = verify(run, reference, checks, cfg.in_chans)
        result = ExportResult("torchscript", [final], t_export.s + t_save.s, t_verify.s, parity,
                              ["torch.jit.trace; batch and resolution follow the input"])
        raise_if_failed(result, final)
    return result
