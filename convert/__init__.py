"""Conversion between PyTorch (reference Wings, HF Qwen2 / Llama / SigLIP) checkpoints and wings_jax params."""
