"""Negative prompting: classifier-free guidance with the concept as the negative prompt.

The unconditional branch of CFG is conditioned on ``concept_text`` instead of the empty prompt, so each
step is pushed away from the concept: ε = ε(x, c_neg) + w (ε(x, c) − ε(x, c_neg)). No weights change.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from saeuron_plugin.benchmark.baselines.base import BaselineRun

NAME = "negative_prompt"


@contextmanager
def erase(
    pipe, concept_text: str, *, retain_texts: Sequence[str] = (), negative_text: str | None = None
) -> Iterator[BaselineRun]:
    """Yield ``pipe`` itself with ``negative_prompt=negative_text or concept_text`` (no retain term).

    ``negative_text`` lets the negative prompt be a well-formed prompt for the concept (e.g. "a star"
    rather than "star" for a model whose text encoder never saw the bare word; see
    :mod:`saeuron_plugin.benchmark.baselines.presets`).

    :func:`saeuron_plugin.benchmark.baselines.generate_with` turns the string into a list of the batch's
    length, as ``StableDiffusionPipeline`` requires for a list of prompts.
    """
    del retain_texts
    yield BaselineRun(pipe=pipe, call_kwargs={"negative_prompt": negative_text or concept_text})
