"""Export the canonical ViT to deployment runtimes, and prove each artifact in its runtime.

Every exporter follows the same contract: write to a temporary file beside the target, load
that file back in the runtime that will serve it (onnxruntime, ``torch.jit.load``,
``aoti_load_package``, safetensors through :func:`vitconv.conversion.pipeline.open_checkpoint`), run it
on seeded inputs next to the PyTorch model, and only then rename it into place. An artifact
that disagrees past tolerance never appears under its final name and the figures travel in
the :class:`~vitconv.errors.VerificationError` (CLI exit 3). Shared pieces are in
:mod:`vitconv.runtime.export.common`; :func:`run_export` is the driver behind ``vitconv export``.
"""

from __future__ import annotations

from vitconv.lazy import lazy_module

#: What :mod:`vitconv.runtime.export.run` gives the package: taken from there on first use (PEP 562),
#: so that importing one exporter's shared pieces (``vitconv.runtime.export.common``) does not
#: load every exporter (onnx, onnxruntime's converter, torch.export), which a conversion never needs.
_RUN = ("ExportPlan", "ExportResult", "Parity", "Check", "run_export", "default_output", "check_plan",
        "export_ready", "make_reference")
__all__ = list(_RUN)


_run = lazy_module("vitconv.runtime.export.run")  # the exporters, on first use (see _RUN)


def __getattr__(name: str):
    if name in _RUN:
        return getattr(_run, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
