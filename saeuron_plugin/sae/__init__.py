"""The SAE core: tensors only. Never imports diffusers, transformers or comfy."""

from .config import SaeConfig, SaeConfigError
from .model import SaeOutput, SparseAutoencoder, SparseCode
from .store import ActivationStore, ActivationStoreError

__all__ = [
    "ActivationStore",
    "ActivationStoreError",
    "SaeConfig",
    "SaeConfigError",
    "SaeOutput",
    "SparseAutoencoder",
    "SparseCode",
]
