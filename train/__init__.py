"""Training loops of VideoPrism-fast (installed as `videoprism.train`): stage 1 (video-text contrastive) and
stage 2 (masked video modeling with global-local distillation)."""
