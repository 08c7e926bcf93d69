"""Proof that a conversion computes what its source computes: the comparison core, the golden
regression suite, and the independent references (``references/``)."""
