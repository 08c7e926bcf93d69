"""Where a converted model runs: export (ONNX, TorchScript, ``.pt2``), the runtimes that run what
export writes, ``predict`` and the preprocessing and labels it needs."""
