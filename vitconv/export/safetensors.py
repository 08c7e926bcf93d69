"""Canonical ``.safetensors`` (``format: pt`` + vitconv config in ``__metadata__``), sharded
above a size threshold, verified by reading it back into :func:`vitconv.build_model`.

This is a checkpoint, not a graph: the hybrid stem keeps its raw kernels (standardised at
run time), so the file converts back to Google's ``.npz`` bit for bit. Above
``shard_bytes`` the tensors are split, in state-dict order, into
``STEM-0000k-of-0000N.safetensors`` plus ``STEM.safetensors.index.json`` (Hugging Face's
index format: ``metadata.total_size`` and ``weight_map``); with ``OUT = DIR/model.safetensors``
these are exactly the names Hugging Face loaders look for. Every shard carries the same
``__metadata__`` so any one of them identifies the model.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Dict, Sequence

import numpy as np

from ..formats.atomic import atomic_output
from ..formats.safetensors_io import CONFIG_KEY
from ..formats.safetensors_stream import TensorSpec, index_path, plan_shards, shard_names
from . import Check, ExportResult, PathLike, Reference, Timer, raise_if_failed, verify

#: Shard above 5 GB by default (Hugging Face's ``max_shard_size`` default).
DEFAULT_SHARD_BYTES = 5 * 10**9


def read_back(paths: Sequence[Path]):
    """All tensors and the first file's metadata, as :func:`vitconv.load` would see them."""
    from safetensors import safe_open

    tensors: Dict[str, np.ndarray] = {}
    meta: Dict[str, str] = {}
    for p in paths:
        with safe_open(os.fspath(p), framework="np") as f:
            meta = meta or dict(f.metadata() or {})
            for k in f.keys():
                tensors[k] = f.get_tensor(k)
    return tensors, meta


def export_safetensors(model, path: PathLike, reference: Reference, checks: Sequence[Check], *,
                       fp16: bool = False, shard_bytes: int = DEFAULT_SHARD_BYTES,
                       source_sha256: str = "") -> ExportResult:
    """Write the canonical state dict (float16 with ``fp16``), read every file back, rebuild
    the model from what was read and verify it on ``checks``. Files are renamed into place
    only after verification."""
    import torch
    from safetensors.numpy import save_file

    from ..checkpoint import build_model, read_canonical
    from ..formats.base import DictSource

    cfg = model.config
    dtype = np.float16 if fp16 else np.float32
    state = {k: v.detach().cpu().numpy().astype(dtype) for k, v in model.state_dict().items()}
    meta = {"format": "pt", CONFIG_KEY: json.dumps(cfg.to_dict(), sort_keys=True),
            "dtype": "float16" if fp16 else "float32", "source_sha256": source_sha256}
    specs = [TensorSpec(k, a.dtype, tuple(a.shape)) for k, a in state.items()]
    groups = [[s.name for s in g] for g in plan_shards(specs, shard_bytes)]
    if len(groups) == 1:
        files, index = [Path(path)], None
    else:  # the streaming writer's names: model-0000k-of-0000N.safetensors + index.json
        files, index = shard_names(Path(path), len(groups)), index_path(Path(path))
    with contextlib.ExitStack() as stack:
        with Timer() as t_export:
            tmps = [stack.enter_context(atomic_output(f, suffix=".safetensors")) for f in files]
            for tmp, names in zip(tmps, groups):
                save_file({k: np.ascontiguousarray(state[k]) for k in names}, os.fspath(tmp), metadata=meta)
            if index is not None:
                tmp_index = stack.enter_context(atomic_output(index, suffix=".json"))
                weight_map = {k: f.name for f, names in zip(files, groups) for k in names}
                total = int(sum(a.nbytes for a in state.values()))
                tmp_index.write_text(json.dumps({"metadata": {**meta, "total_size": total},
                                                 "weight_map": weight_map}, indent=2, sort_keys=True))
        with Timer() as t_verify:
            tensors, read_meta = read_back(tmps)
            canon = read_canonical(files[0], source=DictSource(tensors, os.fspath(files[0]), read_meta))
            rebuilt = build_model(canon.config, canon.state_dict())

            def run(a):
                with torch.no_grad():
                    return rebuilt(torch.from_numpy(a)).numpy()

            parity = verify(run, reference, checks, cfg.in_chans, fp16=fp16)
        notes = [f"{len(files)} shards + {index.name}" if index else "single file",
                 "format: pt, vitconv_config in __metadata__" + (", float16 weights" if fp16 else "")]
        result = ExportResult("safetensors" + (" fp16" if fp16 else ""),
                              files + ([index] if index else []), t_export.s, t_verify.s, parity,
                              notes, fp16)
        raise_if_failed(result, files[0])
    return result
