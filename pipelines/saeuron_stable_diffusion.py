"""SAeUron as a diffusers community pipeline: Stable Diffusion that can unlearn concepts per call.

    from diffusers import DiffusionPipeline
    pipe = DiffusionPipeline.from_pretrained(
        "stable-diffusion-v1-5/stable-diffusion-v1-5",
        custom_pipeline="pipelines/saeuron_stable_diffusion.py", trust_remote_code=True)
    image = pipe("a cat in Van Gogh style", sae="org/sae-bundle", unlearn=["Van Gogh"]).images[0]

``sae`` is a bundle folder, a Hub repo id or a loaded ``SAeUron``; it is loaded once and kept
(``pipe.load_sae(...)`` does the same ahead of time). ``unlearn`` names the concepts to remove
for this call, ``unlearn_strength`` overrides their strength, and ``unlearn_options`` passes any
other option of ``SAeUron.apply`` (percentile, encoder, apply_to, ...). Without ``unlearn`` the
pipeline is plain Stable Diffusion, bit for bit. The logic lives in the ``saeuron-plugin``
package (``pip install saeuron-plugin``); this file only connects it to the pipeline call.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from diffusers import StableDiffusionPipeline

from saeuron_plugin import SAeUron


class SAeUronStableDiffusionPipeline(StableDiffusionPipeline):
    """``StableDiffusionPipeline`` with ``sae=`` / ``unlearn=`` call arguments (SAeUron feature ablation)."""

    def load_sae(self, sae: str | SAeUron, **load_kwargs: Any) -> SAeUron:
        """Load (or adopt) an SAE bundle and keep it for later calls; returns it."""
        if isinstance(sae, SAeUron):
            eraser = sae
        else:
            cache = self.__dict__.setdefault("_saeuron_bundles", {})
            eraser = cache.get(str(sae))
            if eraser is None:
                eraser = cache[str(sae)] = SAeUron.from_pretrained(sae, **load_kwargs)
        self.__dict__["_saeuron_eraser"] = eraser
        return eraser

    @property
    def sae(self) -> SAeUron | None:
        """The bundle loaded last (None before any)."""
        return self.__dict__.get("_saeuron_eraser")

    def __call__(
        self,
        *args: Any,
        sae: str | SAeUron | None = None,
        unlearn: str | Sequence[str] | None = None,
        unlearn_strength: float | Mapping[str, float] | None = None,
        unlearn_options: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> Any:
        eraser = self.load_sae(sae) if sae is not None else self.sae
        if not unlearn:
            return super().__call__(*args, **kwargs)
        if eraser is None:
            raise ValueError("unlearn=... needs an SAE bundle: pass sae='<folder or repo>' or call load_sae")
        with eraser.unlearn(self, unlearn, strength=unlearn_strength, **dict(unlearn_options or {})):
            return super().__call__(*args, **kwargs)
