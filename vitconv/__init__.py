"""vitconv: Vision Transformer weights between Google JAX ``.npz``, PyTorch layouts and
runtimes, proven exact against reference outputs.

>>> import vitconv
>>> model = vitconv.load("golden/jax/tiny_token_p8_32.npz")          # doctest: +SKIP
>>> vitconv.convert("golden/jax/tiny_token_p8_32.npz", "tiny_hf")    # doctest: +SKIP
"""

from vitconv.config import ViTConfig
from vitconv.errors import BadInputError, MappingError, VerificationError, VitconvError

__version__ = "0.1.0"
__all__ = ["ViTConfig", "load", "convert", "open_checkpoint", "VisionTransformer", "VitconvError",
           "BadInputError", "MappingError", "VerificationError", "__version__"]


def __getattr__(name):
    # The pipeline and torch load on first use: `import vitconv.verification.references.google_numpy` stays free of the
    # converter's mapping code, and `import vitconv` (and the CLI) start without torch.
    if name == "open_checkpoint":
        from vitconv.conversion import pipeline

        return pipeline.open_checkpoint
    if name == "convert":  # the pipeline's, with a model card in a directory output
        from vitconv.conversion.service import convert

        return convert
    if name == "load":
        from vitconv.conversion.loading import load

        return load
    if name == "VisionTransformer":
        from vitconv.model import VisionTransformer

        return VisionTransformer
    raise AttributeError(f"module 'vitconv' has no attribute {name!r}")
