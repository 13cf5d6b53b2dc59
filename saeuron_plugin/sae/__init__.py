"""The SAE core: tensors only. Never imports diffusers, transformers or comfy."""

from .model import SaeConfig, SaeConfigError, SaeOutput, SparseAutoencoder, SparseCode

__all__ = ["SaeConfig", "SaeConfigError", "SaeOutput", "SparseAutoencoder", "SparseCode"]
