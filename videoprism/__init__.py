"""VideoPrism-fast: a PyTorch VideoPrism with exact official-checkpoint parity and fused kernels."""
