"""Recommended baseline hyperparameters for the shipped ShapesCanvas default model.

The baselines take ``concept_text`` as it appears in prompts ("star", "striped style", "red"). The
default model's small causal text encoder only ever saw whole captions ("a red star in striped style",
partial ones such as "a star" or "a red shape"): the bare word "star" encodes to an embedding that has
almost nothing in common with "star" inside a caption (cosine −0.48 at the word's position), and as a
prompt it does not draw a star. Conditioning a baseline on the bare word therefore does nothing on this
model. These presets give each method a well-formed text for the concept instead:

- negative prompt / SLD: the caption of the concept alone ("a star", "a shape in striped style",
  "a red shape");
- UCE: every caption of the concept as a template, with ``{}`` where the concept's text goes, its
  tokens and all later ones edited (``include_suffix``); target "shape" for objects (the dataset's
  generic noun), "" for styles and colors;
- ESD-x: the caption of the concept alone as the training prompt (as the paper trains on the
  concept's name).

Measured with these presets (25 DDIM steps, CFG 5; 12 prompts with the concept / 12 without, one seed
each; judge accuracy on the concept's domain, with / without the concept; plain model: 1.00 / 1.00):

| concept       | negative prompt | SLD medium  | UCE         | ESD-x (200 steps, lr 1e-3) |
|---------------|-----------------|-------------|-------------|----------------------------|
| star          | 1.00 / 1.00     | 1.00 / 1.00 | 0.17 / 1.00 | 0.08 / 1.00                |
| striped style | 1.00 / 1.00     | 1.00 / 1.00 | 0.33 / 1.00 | 0.42 / 0.92                |
| red           | 1.00 / 0.58     | 1.00 / 1.00 | 0.00 / 1.00 | 0.75 / 1.00                |

Negative prompting cannot remove a concept the prompt names (ε_neg and ε_cond both carry it); SLD's
medium setting leaves the first 20 % of the steps (where the shape is laid out) untouched, and its
"max" setting (no warm-up, s_S = 5000, λ = 1) does remove the star (1.00 -> 0.08 with "a star").
UCE on "red" also costs object / style accuracy on the red images (0.75 / 0.92).
"""

from __future__ import annotations

import re
from typing import Any

from saeuron_plugin.shapescanvas import data as sc


def concept_domain(concept_text: str) -> tuple[str, str]:
    """("object" | "style" | "color", vocabulary word) of a concept text such as "striped style"."""
    word = concept_text.strip().lower()
    word = word[: -len(" style")] if word.endswith(" style") else word
    for domain, vocab in sc.VOCABULARIES.items():
        if word in vocab:
            return domain, word
    raise ValueError(f"{concept_text!r} is not a ShapesCanvas object, style or color")


def concept_caption(concept_text: str) -> str:
    """Training-style caption of the concept alone: "a star", "a shape in striped style", "a red shape"."""
    domain, word = concept_domain(concept_text)
    return sc.caption(
        **{"obj": None, "style": None, "color": None, {"object": "obj"}.get(domain, domain): word}
    )


def concept_templates(concept_text: str) -> list[str]:
    """Every canonical caption showing the concept, with ``{}`` in place of ``concept_text``."""
    domain, word = concept_domain(concept_text)
    pattern = re.compile(rf"\b{re.escape(concept_text.strip())}\b")
    out = []
    for o, s, c in sc.combinations():
        if {"object": o, "style": s, "color": c}[domain] != word:
            continue
        cap = sc.caption(o, s, c)
        tpl = pattern.sub("{}", cap, count=1)
        if "{}" in tpl:
            out.append(tpl)
    return out


def shapescanvas_hparams(method: str, concept_text: str) -> dict[str, Any]:
    """Keyword arguments for ``BASELINES[method].erase(pipe, concept_text, **them)`` on the default model."""
    if method == "negative_prompt":
        return {"negative_text": concept_caption(concept_text)}
    if method == "sld":
        return {"safety_concept": concept_caption(concept_text)}
    if method == "uce":
        domain, _ = concept_domain(concept_text)
        return {
            "templates": concept_templates(concept_text),
            "include_suffix": True,
            "target_text": "shape" if domain == "object" else "",
        }
    if method == "esd":
        return {"prompts": [concept_caption(concept_text)]}
    raise ValueError(f"unknown baseline {method!r}")


def joint_caption_pairs(concepts: list[str]) -> tuple[list[tuple[str, str]], list[str]]:
    """UCE's keys for removing several ShapesCanvas concepts at once (:func:`.uce.caption_keys`).

    ``concepts`` are vocabulary words ("star", "striped", "red"). Every canonical caption that holds any
    of them is paired with the same caption without them ("a red star in striped style" becomes "a red
    shape in striped style" when star goes, "" when all three go); the captions that hold none are the
    preserved ones.
    """
    gone = {concept_domain(c)[1] for c in concepts}
    pairs, kept = [], []
    for o, s, c in sc.combinations():
        caption = sc.caption(o, s, c)
        if gone & {o, s, c}:
            pairs.append((caption, sc.caption(*(None if w in gone else w for w in (o, s, c)))))
        else:
            kept.append(caption)
    return pairs, kept
