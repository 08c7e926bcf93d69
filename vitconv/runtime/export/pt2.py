"""``.pt2``: ``torch.export`` and, by default, an AOTInductor package, verified by loading it
back (``torch._inductor.aoti_load_package``; ``torch.export.load`` for the program-only form).

An AOTInductor package is compiled ahead of time to native code (gcc on CPU) and runs
without Python model code; compiling it is the slow step (tens of seconds for a tiny model on
a small CPU, longer for a real ViT). ``aoti=False`` writes the ``ExportedProgram`` itself
(``torch.export.save``): seconds, portable, and what other compilers consume. Both keep the
dynamic batch (and, with ``dynamic_size``, height/width as multiples of the stride) declared
for :mod:`vitconv.runtime.export.onnx`.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Optional, Sequence

from vitconv.formats.atomic import atomic_output, guarded_file
from vitconv.runtime.export.common import (Check, ExportResult, PathLike, Reference, Timer, export_ready, raise_if_failed, release, take,
                     verify)
from vitconv.runtime.export.onnx import dynamic_shapes, example_input


def export_pt2(model, path: PathLike, reference: Reference, checks: Sequence[Check], *,
               batch: Optional[int] = None, dynamic_size: bool = False,
               aoti: bool = True) -> ExportResult:
    """Export with ``torch.export``; with ``aoti`` compile an AOTInductor package. Load the
    written file back, verify on ``checks``, rename into place only if it agrees. ``model``
    may be handed over (:func:`~vitconv.runtime.export.common.take`): then its weights are freed once
    written, before the file is loaded back."""
    import torch

    model, owned = take(model)
    cfg = model.config
    ready = export_ready(model)
    x = example_input(cfg, batch)
    final = Path(path)
    with atomic_output(final, suffix=".pt2") as tmp:
        with Timer() as t_export, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with torch.no_grad():
                program = torch.export.export(
                    ready, (x,), dynamic_shapes=dynamic_shapes(cfg.total_stride, batch, dynamic_size))
            if aoti:
                from torch._inductor import aoti_compile_and_package

                with guarded_file(tmp) as f:  # a failed write would abort the process inside torch
                    aoti_compile_and_package(program, package_path=f)
            else:
                with guarded_file(tmp) as f:
                    torch.export.save(program, f)
        del program  # it holds the model's tensors
        if owned:
            release(ready, model)
        del ready, model
        with Timer() as t_verify:
            if aoti:
                from torch._inductor import aoti_load_package

                loaded = aoti_load_package(os.fspath(tmp))
            else:
                loaded = torch.export.load(os.fspath(tmp)).module()

            def run(a):
                with torch.no_grad():
                    return loaded(torch.from_numpy(a)).numpy()

            parity = verify(run, reference, checks, cfg.in_chans)
        note = ("AOTInductor package (aoti_load_package)" if aoti
                else "ExportedProgram (torch.export.save / torch.export.load)")
        result = ExportResult("pt2", [final], t_export.s, t_verify.s, parity, [note])
        raise_if_failed(result, final)
    return result
