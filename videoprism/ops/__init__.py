"""Public ops of VideoPrism-fast (registered custom ops with a backend switch)."""
from videoprism.ops.attention import factorized_attention

__all__ = ["factorized_attention"]
