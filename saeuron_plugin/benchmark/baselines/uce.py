"""Unified Concept Editing (Gandikota et al., WACV 2024): a closed-form edit of the cross-attention.

For every cross-attention module (``attn2`` in SD 1.x, found by ``is_cross_attention``) and each of its
key and value projections W (``to_k``, ``to_v``), with edit keys c_i (text-encoder outputs of the
concept's tokens), their targets c*_i (same positions of the target prompt) and preserved keys c_j:

    W' = argmin Σ_i ‖W' c_i − W c*_i‖² + λ Σ_j ‖W' c_j − W c_j‖² + ε ‖W' − W‖²_F
       = (Σ_i W c*_i c_iᵀ + λ Σ_j W c_j c_jᵀ + ε W) (Σ_i c_i c_iᵀ + λ Σ_j c_j c_jᵀ + ε I)⁻¹

The ε W term in the numerator goes with the ε I of the inverse: it is the ridge that keeps W' = W on
directions no key spans. Without it (ε I in the inverse only) W' maps every text direction outside
span{c_i, c_j} to ~0, which wrecks the model once few keys are given. Solved in float64, cast back.

Keys. A prompt template (``"{}"`` by default, i.e. the concept text alone, as in the paper) is filled with
the concept (edit keys), with ``target_text`` (targets; default "", i.e. the empty prompt at the same
positions) and with each retain text (preserved keys). Edit keys are the embeddings at the concept's
token positions; with ``include_suffix`` also every later position (EOS and padding included),
matched to the target prompt's positions counted from the end of the filled-in text. CLIP's text
encoder is causal, so every later token has seen the concept; in our small ShapesCanvas encoder the
word embedding depends strongly on its context, which is why ``templates`` (e.g. the benchmark's
caption templates with ``{}`` where the concept goes) matter there.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from saeuron_plugin.benchmark.baselines.base import (
    BaselineRun,
    cross_attention_modules,
    encode_prompts,
    restored_tensors,
    squash_spaces,
    tokenize,
    word_tokens,
)

NAME = "uce"


@dataclass
class EditKeys:
    """Keys [N, D] of one edit: concept keys, their targets and the preserved keys."""

    concept: torch.Tensor
    target: torch.Tensor
    retain: torch.Tensor


def _fill(template: str, text: str) -> str:
    return squash_spaces(template.replace("{}", text))


def _span(pipe, template: str, text: str) -> tuple[int, int]:
    """(start, stop) token positions of ``text`` inside ``template`` filled with it (BOS = position 0)."""
    prefix = template.split("{}")[0]
    start = 1 + len(word_tokens(pipe, squash_spaces(prefix)))
    n = len(word_tokens(pipe, text))
    ids = tokenize(pipe, [_fill(template, text)])[0].tolist()
    if n and ids[start : start + n] != word_tokens(pipe, text):
        raise ValueError(f"could not locate the tokens of {text!r} in {_fill(template, text)!r}")
    return start, start + n


def _positions(pipe, template: str, text: str, include_suffix: bool) -> list[int]:
    start, stop = _span(pipe, template, text)
    length = pipe.tokenizer.model_max_length
    return list(range(start, length if include_suffix else min(stop, length)))


def edit_keys(
    pipe,
    concept_text: str,
    retain_texts: Sequence[str] = (),
    target_text: str = "",
    templates: Sequence[str] = ("{}",),
    include_suffix: bool = False,
) -> EditKeys:
    """Edit keys, their targets and the preserved keys (text-encoder outputs, float64)."""
    length = pipe.tokenizer.model_max_length
    concept, target, retain = [], [], []
    for tpl in templates:
        if "{}" not in tpl:
            raise ValueError(f"template {tpl!r} has no '{{}}' for the concept")
        emb = encode_prompts(pipe, [_fill(tpl, concept_text), _fill(tpl, target_text)]).double()
        _, c_stop = _span(pipe, tpl, concept_text)
        _, t_stop = _span(pipe, tpl, target_text)
        for p in _positions(pipe, tpl, concept_text, include_suffix):
            # concept tokens -> same positions of the target prompt; later tokens -> aligned by the end
            q = p if p < c_stop else t_stop + (p - c_stop)
            concept.append(emb[0, p])
            target.append(emb[1, min(q, length - 1)])
        if retain_texts:
            r_emb = encode_prompts(pipe, [_fill(tpl, r) for r in retain_texts]).double()
            for k, r in enumerate(retain_texts):
                retain.extend(r_emb[k, p] for p in _positions(pipe, tpl, r, include_suffix))
    if not concept:
        raise ValueError(f"{concept_text!r} has no tokens to edit")
    d = concept[0].shape[-1]
    empty = torch.zeros(0, d, dtype=torch.float64, device=concept[0].device)
    return EditKeys(torch.stack(concept), torch.stack(target), torch.stack(retain) if retain else empty)


def closed_form(
    w: torch.Tensor, keys: EditKeys, preserve_scale: float, reg: float, erase_scale: float = 1.0
) -> torch.Tensor:
    """UCE's W' for one projection ``w`` [out, D] (float64 result); ``erase_scale`` weighs the edit
    keys against the preserved ones and the ridge (the paper's erase scale)."""
    w64 = w.detach().double()
    c, cs, cr = (k.to(w64.device) for k in (keys.concept, keys.target, keys.retain))
    eye = torch.eye(w64.shape[1], dtype=torch.float64, device=w64.device)
    num = erase_scale * (w64 @ cs.T) @ c + preserve_scale * (w64 @ cr.T) @ cr + reg * w64
    den = erase_scale * c.T @ c + preserve_scale * cr.T @ cr + reg * eye
    return torch.linalg.solve(den, num.T).T  # num @ den⁻¹ (den is symmetric)


def projections(unet) -> dict[str, torch.nn.Parameter]:
    """The ``to_k`` / ``to_v`` weights of every cross-attention module, by parameter name."""
    out = {}
    for name, mod in cross_attention_modules(unet):
        out[f"{name}.to_k.weight"] = mod.to_k.weight
        out[f"{name}.to_v.weight"] = mod.to_v.weight
    return out


@torch.no_grad()
def apply_edit(
    unet, keys: EditKeys, preserve_scale: float = 1.0, reg: float = 0.1, erase_scale: float = 1.0
) -> None:
    """Overwrite every cross-attention key/value projection of ``unet`` with its UCE edit (in place)."""
    for w in projections(unet).values():
        w.copy_(closed_form(w, keys, preserve_scale, reg, erase_scale).to(w.dtype))


@contextmanager
def erase(
    pipe,
    concept_text: str,
    *,
    retain_texts: Sequence[str] = (),
    target_text: str = "",
    templates: Sequence[str] = ("{}",),
    include_suffix: bool = False,
    preserve_scale: float = 1.0,
    reg: float = 0.1,
    erase_scale: float = 1.0,
) -> Iterator[BaselineRun]:
    """Edit ``pipe.unet``'s cross-attention K/V in place for the block; restore them on exit.

    ``preserve_scale`` is λ (1: a preserved key weighs as much as an edited one), ``erase_scale`` the
    weight of the edited keys (1 in the formula above); ``reg`` is ε, the
    ridge toward the original weights. The constraints then hold up to a residual of at most
    ε ‖T − W K‖ / σ_min(K)² (K: the keys, T: their targets): 0.1 is small next to ‖c‖² (≈ 58 for
    our 64-d text encoder, ≈ 800 for SD's CLIP), so well-separated keys are matched to a fraction of a
    percent; strongly correlated keys (small σ_min) are matched less tightly, which is the point of a
    ridge. Directions no key spans keep W exactly. ``templates`` are prompt templates with ``{}``
    where the concept goes; ``target_text`` replaces it for the targets (default "": map to nothing).
    Default keys (template "{}", no suffix) are the paper's; for the ShapesCanvas model use
    :func:`saeuron_plugin.benchmark.baselines.presets.shapescanvas_hparams`.
    """
    keys = edit_keys(pipe, concept_text, retain_texts, target_text, templates, include_suffix)
    with edited(pipe, keys, preserve_scale, reg, erase_scale) as run:
        yield run


@contextmanager
def edited(
    pipe, keys: EditKeys, preserve_scale: float = 1.0, reg: float = 0.1, erase_scale: float = 1.0
) -> Iterator[BaselineRun]:
    """``pipe.unet``'s cross-attention K/V edited for ``keys`` for the block; restored exactly on exit."""
    weights = projections(pipe.unet)
    if not weights:
        raise ValueError("the UNet has no cross-attention modules to edit")
    with restored_tensors(weights):
        apply_edit(pipe.unet, keys, preserve_scale, reg, erase_scale)
        yield BaselineRun(
            pipe=pipe,
            call_kwargs={},
            info={"n_concept_keys": len(keys.concept), "n_retain_keys": len(keys.retain)},
        )


def caption_keys(pipe, pairs: Sequence[tuple[str, str]], retain_captions: Sequence[str] = ()) -> EditKeys:
    """Keys of whole captions, for removing several concepts at once without contradictions.

    Each pair is (caption, the same caption with every concept being removed taken out), e.g.
    ("a red star in striped style", "a red shape in striped style") when star goes, and "" (the empty
    prompt) when star, striped and red go together. The caption's
    text-encoder outputs from the first token where the two differ to the end (EOS and padding
    included) are the edit keys; each maps to the target caption's output at the position aligned
    from the end of the text (clipped to that first token), as :func:`edit_keys` aligns the tokens
    after a concept. Per-concept keys cannot do this: "a red star in striped style" would be a key
    of star's edit (target "a red shape in striped style") and of striped's ("a red star in"), with
    two targets, and least squares would meet neither. ``retain_captions`` are preserved at every
    position after BOS.
    """
    length = pipe.tokenizer.model_max_length
    eos = pipe.tokenizer.eos_token_id
    sources, targets = [s for s, _ in pairs], [t for _, t in pairs]
    ids_s, ids_t = tokenize(pipe, sources).tolist(), tokenize(pipe, targets).tolist()
    emb_s, emb_t = encode_prompts(pipe, sources).double(), encode_prompts(pipe, targets).double()
    concept, target = [], []
    for i, (s_ids, t_ids) in enumerate(zip(ids_s, ids_t)):
        differ = [p for p in range(length) if s_ids[p] != t_ids[p]]
        if not differ:
            continue
        first = differ[0]
        shift = (s_ids.index(eos) if eos in s_ids else length) - (
            t_ids.index(eos) if eos in t_ids else length
        )
        for p in range(first, length):
            concept.append(emb_s[i, p])
            target.append(emb_t[i, min(length - 1, max(first, p - shift))])
    if not concept:
        raise ValueError("no caption differs from its target: nothing to edit")
    d = emb_s.shape[-1]
    retain = torch.zeros(0, d, dtype=torch.float64, device=emb_s.device)
    if retain_captions:
        retain = encode_prompts(pipe, list(retain_captions)).double()[:, 1:].reshape(-1, d)
    return EditKeys(torch.stack(concept), torch.stack(target), retain)
