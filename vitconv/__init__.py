"""vitconv: Vision Transformer weights between Google JAX ``.npz``, PyTorch layouts and
runtimes, proven exact against reference outputs.

>>> import vitconv
>>> model = vitconv.load("golden/jax/tiny_token_p8_32.npz")   # doctest: +SKIP
"""

from .config import ViTConfig
from .errors import BadInputError, MappingError, VerificationError, VitconvError

__version__ = "0.1.0"
__all__ = ["ViTConfig", "load", "read_canonical", "save_canonical", "VisionTransformer",
           "VitconvError", "BadInputError", "MappingError", "VerificationError", "__version__"]


def __getattr__(name):
    # torch-heavy pieces load on first use, so `import vitconv` stays cheap.
    if name in ("load", "read_canonical", "save_canonical"):
        from . import checkpoint

        return getattr(checkpoint, name)
    if name == "VisionTransformer":
        from .model import VisionTransformer

        return VisionTransformer
    raise AttributeError(f"module 'vitconv' has no attribute {name!r}")
