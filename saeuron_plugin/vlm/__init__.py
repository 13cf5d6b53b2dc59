"""Adapter for transformers vision-language models (LLaVA / LLaVA-NeXT, Qwen2-VL / 2.5-VL, Mllama,
Idefics3 / SmolVLM): hookpoints on decoder layers, the multimodal projector and vision-encoder
layers; token selection (image / text / all); activation collection; concept statistics; ablation
during ``generate()``.

    from saeuron_plugin import VLMUnlearner
    with VLMUnlearner.from_pretrained("org/repo").unlearn(model, ["red"]):
        ids = model.generate(**inputs)

Modules: :mod:`.hookpoints` (families, discovery, errors), :mod:`.hooks` (input tracker and token
sites), :mod:`.inputs` (samples and batching), :mod:`.collect` (activation stores),
:mod:`.unlearn` (:class:`~.unlearn.VLMUnlearner`), :mod:`.commands` (CLI handlers). Nothing here
imports transformers at import time; the adapter imports the core only.
"""
