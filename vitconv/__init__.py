"""vitconv: Vision Transformer weights between Google JAX ``.npz``, PyTorch layouts and
runtimes, proven exact against reference outputs.

>>> import vitconv
>>> model = vitconv.load("golden/jax/tiny_token_p8_32.npz")          # doctest: +SKIP
>>> vitconv.convert("golden/jax/tiny_token_p8_32.npz", "tiny_hf")    # doctest: +SKIP
"""

from vitconv.config import ViTConfig
from vitconv.errors import BadInputError, MappingError, VerificationError, VitconvError
from vitconv.lazy import lazy_module

__version__ = "0.1.0"
__all__ = ["ViTConfig", "load", "convert", "open_checkpoint", "ReadOptions", "ConvertOptions", "VisionTransformer",
           "VitconvError", "BadInputError", "MappingError", "VerificationError", "__version__"]


#: Loaded on first use: `import vitconv.verification.references.google_numpy` stays free of the
#: converter's mapping code, and `import vitconv` (and the CLI) start without torch.
_api = lazy_module("vitconv.conversion.api")  # keyword calls onto the convert service and the reader
_options = lazy_module("vitconv.conversion.options")
_loading = lazy_module("vitconv.conversion.loading")  # torch
_model = lazy_module("vitconv.model")  # torch
_LAZY = {"open_checkpoint": (_api, "open_checkpoint"), "convert": (_api, "convert"),
         "ReadOptions": (_options, "ReadOptions"), "ConvertOptions": (_options, "ConvertOptions"),
         "load": (_loading, "load"), "VisionTransformer": (_model, "VisionTransformer")}


def __getattr__(name):
    if name in _LAZY:
        module, attr = _LAZY[name]
        return getattr(module, attr)
    raise AttributeError(f"module 'vitconv' has no attribute {name!r}")
