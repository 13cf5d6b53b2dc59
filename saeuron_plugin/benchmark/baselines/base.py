"""Shared interface and helpers of the baseline unlearning methods.

Every method module exposes ``NAME`` and a context manager
``erase(pipe, concept_text, *, retain_texts=(), **hparams) -> Iterator[BaselineRun]``. On entry it
prepares the method for a ``StableDiffusionPipeline`` (SD 1.x-shaped); on exit it puts ``pipe`` back
exactly as it was (weights bit-identical, attributes restored), also when the block raises.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers.models.attention_processor import Attention


@dataclass
class BaselineRun:
    """What generation needs while a baseline is active: the pipeline to call and extra call kwargs.

    ``info`` holds diagnostics of the preparation (e.g. ESD's cache hit / miss); generation ignores it.
    """

    pipe: Any  # a diffusers pipeline to call like StableDiffusionPipeline
    call_kwargs: dict[str, Any] = field(default_factory=dict)  # merged into every pipe(...) call
    info: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------ modules
def cross_attention_modules(unet: torch.nn.Module) -> list[tuple[str, Attention]]:
    """Every cross-attention ``Attention`` of ``unet`` (``attn2`` in SD 1.x), found by type, not by name."""
    return [(n, m) for n, m in unet.named_modules() if isinstance(m, Attention) and m.is_cross_attention]


def cross_attention_parameters(unet: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """Named parameters (``unet.named_parameters`` names) of every cross-attention module (ESD-x's set)."""
    out: dict[str, torch.nn.Parameter] = {}
    for name, mod in cross_attention_modules(unet):
        for pn, p in mod.named_parameters():
            out[f"{name}.{pn}"] = p
    return out


@contextmanager
def restored_tensors(tensors: dict[str, torch.Tensor]) -> Iterator[None]:
    """Save clones of ``tensors`` and copy them back on exit (bit-identical), also on exceptions.

    Also restores ``requires_grad`` and ``.grad`` of parameters, so training inside the block leaves
    no trace.
    """
    saved = {n: t.detach().clone() for n, t in tensors.items()}
    flags = {n: t.requires_grad for n, t in tensors.items()}
    grads = {n: t.grad for n, t in tensors.items() if isinstance(t, torch.nn.Parameter)}
    try:
        yield
    finally:
        with torch.no_grad():
            for n, t in tensors.items():
                t.copy_(saved[n])
                if t.is_leaf:
                    t.requires_grad_(flags[n])
                if n in grads:
                    t.grad = grads[n]


@contextmanager
def restored_module_state(modules: Iterable[torch.nn.Module]) -> Iterator[None]:
    """Restore ``training`` mode and ``requires_grad`` of every parameter of ``modules`` on exit."""
    modules = list(modules)
    modes = [[(m, m.training) for m in mod.modules()] for mod in modules]
    flags = [[(p, p.requires_grad) for p in mod.parameters()] for mod in modules]
    try:
        yield
    finally:
        for group in modes:
            for m, training in group:
                m.training = training
        for group in flags:
            for p, f in group:
                p.requires_grad_(f)


# --------------------------------------------------------------------------------------------- text
def tokenize(pipe, texts: Sequence[str]) -> torch.Tensor:
    """Token ids [B, L] padded to the tokenizer's ``model_max_length`` (as the pipeline does)."""
    return pipe.tokenizer(
        list(texts),
        padding="max_length",
        max_length=pipe.tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids


@torch.no_grad()
def encode_prompts(pipe, texts: Sequence[str]) -> torch.Tensor:
    """Text-encoder output embeddings [B, L, D] of ``texts``, exactly as the pipeline conditions on them."""
    emb, _ = pipe.encode_prompt(list(texts), pipe.device, 1, False)
    return emb


def word_tokens(pipe, text: str) -> list[int]:
    """Token ids of ``text`` without the special (BOS / EOS / padding) tokens."""
    return pipe.tokenizer(text, add_special_tokens=False).input_ids


def squash_spaces(text: str) -> str:
    return " ".join(text.split())


# ------------------------------------------------------------------------------------------ caching
def slugify(text: str, max_len: int = 48) -> str:
    """File-name-safe form of a concept text: lower case, runs of other characters become ``-``."""
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return (slug or "concept")[:max_len]


def fingerprint(*modules: torch.nn.Module) -> str:
    """Hash of every parameter and buffer (names, shapes, dtypes, bytes) of ``modules``."""
    h = hashlib.blake2b(digest_size=16)
    for mod in modules:
        for name, t in list(mod.state_dict().items()):
            h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
            h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def hparam_hash(hparams: dict[str, Any], extra: str = "") -> str:
    """Short stable hash of a JSON-able hyperparameter dict (plus ``extra``, e.g. a model fingerprint)."""
    text = json.dumps(hparams, sort_keys=True, default=str) + "|" + extra
    return hashlib.sha256(text.encode()).hexdigest()[:16]
