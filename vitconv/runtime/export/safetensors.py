"""Canonical ``.safetensors`` through the convert service (:func:`vitconv.conversion.service.convert`:
the same bytes ``vitconv convert SRC OUT.safetensors`` writes), verified before it is
renamed into place by reading every written file back into :func:`vitconv.build_model`.

With ``fp16`` the file is proved as ``convert --dtype float16 --verify`` proves the same bytes
(:mod:`vitconv.verification.compare`): every tensor the float32 conversion's rounded to float16,
bit for bit, and the rounded model's logits by the rounded-weights rule (every top-1 equal,
cosine >= 0.9999) against the float32 model's.

This is a checkpoint, not a graph: the hybrid stem keeps its raw kernels (standardised at
run time), so the file converts back to Google's ``.npz`` bit for bit. Above
``shard_bytes`` the tensors are split into ``STEM-0000k-of-0000N.safetensors`` plus
``STEM.safetensors.index.json`` (Hugging Face's index format); with
``OUT = DIR/model.safetensors`` these are exactly the names Hugging Face loaders look for.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import List, Sequence

from vitconv.errors import VerificationError
from vitconv.formats.safetensors_io import read_back
from vitconv.conversion.options import ConvertOptions
from vitconv.conversion.pipeline import Written, open_checkpoint
from vitconv.conversion.service import convert
from vitconv.runtime.export.common import Check, ExportResult, PathLike, Reference, Timer, raise_if_failed, verify
from vitconv.lazy import lazy_module
from vitconv.verification.compare import CanonicalTensors, check_rounded

loading = lazy_module("vitconv.conversion.loading")  # torch


def export_safetensors(src: PathLike, path: PathLike, reference: Reference, checks: Sequence[Check],
                       options: ConvertOptions) -> ExportResult:
    """Convert ``src`` to the canonical ``.safetensors`` at ``path`` through the convert service
    (:func:`vitconv.conversion.service.convert`: staged, read, written, checked, committed) as
    ``options`` say (float16 with ``dtype="float16"``), read every file back, rebuild the model
    from what was read and verify it on ``checks`` in the service's hook. Files are renamed into
    place only after verification."""
    import torch

    fp16 = options.dtype == "float16"
    results: List[ExportResult] = []
    with Timer() as t_total:
        def check(written: Written) -> None:
            temporaries = written.temporaries
            if len(temporaries) > 1:  # shards, then their index
                temporaries = temporaries[:-1]
            bad = None
            with Timer() as t_verify:
                with open_checkpoint(temporaries[0], source=read_back(temporaries)) as ckpt:
                    rebuilt = loading.build_model(ckpt.config, ckpt.state_dict())
                    if fp16:  # the bytes: the float32 conversion rounded, tensor by tensor
                        with open_checkpoint(src, replace(options.reading(), dtype=None)) as exact:
                            bad = check_rounded(exact.tensors(), CanonicalTensors(ckpt), "float16")[0]

                def run(a):
                    with torch.no_grad():
                        return rebuilt(torch.from_numpy(a)).numpy()

                parity = verify(run, reference, checks, rebuilt.config.in_chans, fp16=fp16)
            n = len(temporaries)
            notes = [f"{n} shards + index" if n > 1 else "single file",
                     "format: pt, vitconv_config in __metadata__" + (", float16 weights" if fp16 else "")]
            result = ExportResult("safetensors" + (" fp16" if fp16 else ""), [Path(path)], 0.0, t_verify.s,
                                  parity, notes, fp16)
            results.append(result)
            if bad is not None:
                err = VerificationError(f"safetensors fp16: {bad}; nothing written", path)
                err.results = [result]  # type: ignore[attr-defined]
                raise err
            raise_if_failed(result, path)

        report = convert(src, path, options, hook=check)
    result = results[0]
    result.export_s, result.paths = t_total.s - result.verify_s, [Path(p) for p in report.files]
    return result
