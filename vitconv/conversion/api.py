"""The keyword front doors of :mod:`vitconv`: ``vitconv.convert(src, dst, image_size=384, ...)``
and ``vitconv.open_checkpoint(path, num_heads=12, ...)``. Why: a Python caller names the few
choices it makes, as the commands' flags do; each call builds the one frozen options object
(:mod:`vitconv.conversion.options`) that the pipeline and the convert service take whole.
Every keyword is a field of :class:`~vitconv.conversion.options.ConvertOptions` (``convert``)
or :class:`~vitconv.conversion.options.ReadOptions` (``open_checkpoint``); ``options`` gives a
prepared one, which the keywords then vary.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

from vitconv.conversion.options import ConvertOptions, ReadOptions
from vitconv.conversion.pipeline import Checkpoint, ConversionReport, Hook, PathLike, Progress
from vitconv.conversion.pipeline import open_checkpoint as open_with
from vitconv.conversion.service import convert as convert_with
from vitconv.formats.base import TensorSource


def open_checkpoint(path: PathLike, options: ReadOptions = ReadOptions(), *,
                    source: Optional[TensorSource] = None, **fields: Any) -> Checkpoint:
    """``path`` read as a :class:`~vitconv.conversion.pipeline.Checkpoint` (close it, or use it as
    a context manager) by :func:`vitconv.conversion.pipeline.open_checkpoint`, with ``options``
    varied by ``fields`` (``image_size=``, ``num_heads=``, ``overrides=``, ``require_layout=``,
    ``dtype=``, ``patch_size=``, ``labels=``, ``num_classes=``: what each does is said there).

    >>> with vitconv.open_checkpoint("ViT-B_16.npz", image_size=384) as ckpt:   # doctest: +SKIP
    ...     print(ckpt.config.describe())
    """
    return open_with(path, dataclasses.replace(options, **fields), source=source)


def convert(src: PathLike, dst: PathLike, options: ConvertOptions = ConvertOptions(), *,
            hook: Optional[Hook] = None, progress: Optional[Progress] = None, **fields: Any) -> ConversionReport:
    """The convert service (:func:`vitconv.conversion.service.convert`: URLs staged, read, written,
    verified, committed) with ``options`` varied by ``fields``: the read-side ones of
    :func:`open_checkpoint`, and ``to=``, ``shard_bytes=``, ``hash_source=``, ``metadata=``,
    ``source_sha256=``, ``verify=``, ``command=``.

    >>> vitconv.convert("ViT-B_16.npz", "vit_hf", verify=True)   # doctest: +SKIP
    """
    return convert_with(src, dst, dataclasses.replace(options, **fields), hook=hook, progress=progress)


__all__ = ["open_checkpoint", "convert", "ReadOptions", "ConvertOptions"]
