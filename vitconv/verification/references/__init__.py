"""Independent references for ``verify``: NumPy forward passes of Google's and big_vision's ViTs that
share no mapping code with the converter, and the source library's own model (timm, transformers, ...)."""
