"""Public ops of VideoPrism-fast (registered custom ops with a backend switch)."""
from videoprism.ops.attention import factorized_attention
from videoprism.ops.token_ops import gather_tokens, patchify_gather, scatter_tokens, shuffle_with_mask_tokens

__all__ = ["factorized_attention", "gather_tokens", "patchify_gather", "scatter_tokens", "shuffle_with_mask_tokens"]
