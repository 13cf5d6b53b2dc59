"""Put SAE edits into a ComfyUI ``ModelPatcher``: hookpoint mapping, τ from σ, CFG rows, patch objects.

Nothing here imports ComfyUI at module level: every function takes the objects it works on
(a ``ModelPatcher``, its ``model_sampling``, a diffusers→ComfyUI key map), so the logic is unit
tested with fakes when ComfyUI is absent. Only :func:`diffusers_key_map` imports ``comfy.utils``.

Hookpoints are the diffusers module paths of the bundle (``unet.up_blocks.1.attentions.1``,
``unet.up_blocks.1.attentions.1.transformer_blocks.0.attn2``). They are mapped to ComfyUI modules
with ``comfy.utils.unet_to_diffusers(unet_config)`` (the weight-key map ComfyUI itself uses to
load diffusers UNets), never a hand-written table. Two mechanisms, by hookpoint kind:

* ``block`` (a ``Transformer2DModel`` output, residual included): an object patch replacing
  ``diffusion_model.output_blocks.N.1`` with a wrapper whose class subclasses the original
  block's class (ComfyUI dispatches ``SpatialTransformer`` by ``isinstance``). The wrapper shares
  the original's submodule, parameter and buffer dicts, so module paths, weight keys (LoRA
  patches, low-VRAM casting) and ``.to()`` behave as without it; the SAE is not a submodule.
* ``attn2`` (cross-attention output, post ``to_out``, pre residual): a
  ``set_model_attn2_output_patch`` callable filtered on ``extra_options["block"]`` and
  ``["block_index"]``.

Per call, τ comes from ``extra_options["sigmas"]`` through the model's own
``model_sampling.timestep(σ)`` divided by its number of training steps: the same integer t, so
the same τ bucket, as the diffusers adapter. Conditional rows come from
``extra_options["cond_or_uncond"]`` (0 = cond, 1 = uncond; one entry per batch chunk, in any
order; an uncond chunk may be missing or come in a separate call). The start/end percent window
is tested on σ exactly as ComfyUI's own timestep ranges are: active iff
``percent_to_sigma(end) <= σ <= percent_to_sigma(start)``.

Patch objects survive ``ModelPatcher.clone()`` (``__deepcopy__`` returns self: the SAE is never
copied) and ComfyUI's ``model_patches_to(device | dtype)`` (``.to()`` moves the SAE to a device,
ignores dtypes and returns self). SAE math runs in fp32; outputs have the activation's dtype.
"""

from __future__ import annotations

import logging
import re
import sys
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ..errors import SAeUronError
from ..sae.sites import CallContext

log = logging.getLogger("saeuron.comfyui")

Kind = Literal["block", "attn2"]
PATCH_LIST_NAME = "saeuron_sae"
"""``transformer_options["patches"]`` list our SAE holders sit in, so ``model_patches_to`` moves them."""
DENOISER_PREFIX = "unet."
_BLOCK_RE = re.compile(
    r"^(down_blocks\.\d+\.attentions\.\d+|mid_block\.attentions\.\d+|up_blocks\.\d+\.attentions\.\d+)$"
)
_ATTN2_RE = re.compile(r"^(.+\.attentions\.\d+)\.transformer_blocks\.(\d+)\.attn2$")
_COMFY_BLOCK_RE = re.compile(r"^(input_blocks|output_blocks)\.(\d+)\.1$|^middle_block\.1$")


class IncompatibleBundleError(SAeUronError, ValueError):
    """The SAE bundle cannot be applied to this ComfyUI model (other family, width or hookpoint)."""


# ------------------------------------------------------------------------------------- concepts
def parse_concepts(concepts: str | Iterable[str] | None) -> list[str]:
    """Concept names from a comma / newline separated string or a list; blanks dropped, order kept."""
    if concepts is None:
        return []
    items = re.split(r"[,\n]", concepts) if isinstance(concepts, str) else list(concepts)
    return list(dict.fromkeys(str(c).strip() for c in items if str(c).strip()))


# ------------------------------------------------------------------------------------- mapping
@dataclass(frozen=True)
class ComfyTarget:
    """Where a bundle hookpoint lives in a ComfyUI UNet and how it is patched."""

    hookpoint: str
    """The bundle's diffusers path, e.g. ``unet.up_blocks.1.attentions.1``."""
    kind: Kind
    module_path: str
    """Object path in the ModelPatcher, e.g. ``diffusion_model.output_blocks.4.1``."""
    block: tuple[str, int]
    """``transformer_options["block"]`` of the SpatialTransformer, e.g. ``("output", 4)``."""
    block_index: int | None = None
    """``transformer_options["block_index"]`` of the transformer block (attn2 only)."""


def diffusers_key_map(unet_config: Mapping[str, Any]) -> dict[str, str]:
    """diffusers weight key → ComfyUI weight key, from ComfyUI's own ``unet_to_diffusers``."""
    import comfy.utils

    return comfy.utils.unet_to_diffusers(dict(unet_config))


def comfy_block_of(module: str) -> tuple[str, int]:
    """``("input" | "middle" | "output", N)`` of a ComfyUI SpatialTransformer path (``output_blocks.4.1``)."""
    m = _COMFY_BLOCK_RE.match(module)
    if m is None:
        raise IncompatibleBundleError(f"{module} is not a SpatialTransformer of a ComfyUI UNet")
    if m.group(1) is None:
        return ("middle", 0)
    return ("input" if m.group(1) == "input_blocks" else "output", int(m.group(2)))


def _module_for(diffusers_path: str, key_map: Mapping[str, str]) -> str | None:
    """The ComfyUI module path holding the weights of diffusers module ``diffusers_path``."""
    found = set()
    prefix = diffusers_path + "."
    for key, value in key_map.items():
        if key.startswith(prefix):
            suffix = key[len(diffusers_path) :]
            if value.endswith(suffix):
                found.add(value[: -len(suffix)])
    if len(found) > 1:
        raise IncompatibleBundleError(f"{diffusers_path} maps to several ComfyUI modules: {sorted(found)}")
    return found.pop() if found else None


def valid_hookpoints(key_map: Mapping[str, str]) -> list[str]:
    """Block hookpoints (diffusers paths) the key map knows, in UNet order."""
    seen: dict[str, None] = {}
    for key in key_map:
        m = re.match(r"^((?:down_blocks|up_blocks)\.\d+\.attentions\.\d+|mid_block\.attentions\.\d+)\.", key)
        if m:
            seen.setdefault(DENOISER_PREFIX + m.group(1))
    return list(seen)


def map_hookpoint(hookpoint: str, key_map: Mapping[str, str], family: str | None = None) -> ComfyTarget:
    """Map a bundle hookpoint to its ComfyUI target; :class:`IncompatibleBundleError` if it is not there."""
    what = f"this {family_label(family)} model"
    if not hookpoint.startswith(DENOISER_PREFIX):
        raise IncompatibleBundleError(
            f"hookpoint {hookpoint!r} is not a UNet module (paths start with 'unet.'); the ComfyUI nodes "
            f"patch SD 1.x / 2.x / XL UNets only"
        )
    path = hookpoint[len(DENOISER_PREFIX) :]
    attn = _ATTN2_RE.match(path)
    if _BLOCK_RE.match(path):
        kind: Kind = "block"
    elif attn:
        kind = "attn2"
    else:
        raise IncompatibleBundleError(
            f"hookpoint {hookpoint!r}: the ComfyUI nodes patch Transformer2DModel block outputs "
            "(…attentions.N) and cross-attention outputs (…transformer_blocks.M.attn2), not this module"
        )
    module = _module_for(path, key_map)
    if module is None:
        valid = valid_hookpoints(key_map)
        raise IncompatibleBundleError(
            f"the SAE bundle's hookpoint {hookpoint!r} does not exist in {what}; its cross-attention "
            f"blocks are {', '.join(valid) or 'none'} (was the bundle made for another model?)"
        )
    if kind == "block":
        return ComfyTarget(hookpoint, kind, "diffusion_model." + module, comfy_block_of(module))
    m = re.match(r"^(.+)\.transformer_blocks\.(\d+)\.attn2$", module)
    if m is None:
        raise IncompatibleBundleError(f"{hookpoint!r} maps to {module!r}, not a ComfyUI attn2 module")
    return ComfyTarget(
        hookpoint, kind, "diffusion_model." + module, comfy_block_of(m.group(1)), int(m.group(2))
    )


# ------------------------------------------------------------------------------------ families
_FAMILY_LABELS = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL"}


def family_label(family: str | None) -> str:
    return _FAMILY_LABELS.get(family or "", family or "ComfyUI")


def model_family(model_patcher: Any) -> str | None:
    """sd1 / sd2 / sdxl from the ComfyUI model config class (by name, through its MRO), else None."""
    config = getattr(getattr(model_patcher, "model", None), "model_config", None)
    if config is None:
        return None
    names = [c.__name__ for c in type(config).__mro__]
    for name, family in (
        ("SDXLRefiner", "sdxl"),
        ("SDXL", "sdxl"),
        ("SSD1B", "sdxl"),
        ("SD20", "sd2"),
        ("SD21UnclipL", "sd2"),
        ("SD15", "sd1"),
    ):
        if name in names:
            return family
    return None


def check_family(sae_family: str | None, family: str | None, hookpoint: str) -> None:
    """Refuse an SAE made for another model family (SD 1.x and 2.x only warn: same time scale)."""
    if not sae_family or not family or sae_family == family:
        return
    if {sae_family, family} == {"sd1", "sd2"}:
        warnings.warn(
            f"the SAE for {hookpoint} was made for {family_label(sae_family)}, this model looks "
            f"like {family_label(family)}; features may not mean the same here",
            stacklevel=3,
        )
        return
    raise IncompatibleBundleError(
        f"the SAE for {hookpoint} was made for {family_label(sae_family)} (cfg model_family "
        f"{sae_family!r}) and cannot be applied to this {family_label(family)} model"
    )


def module_width(module: Any, kind: Kind) -> int | None:
    """Activation width of a ComfyUI SpatialTransformer (block) or CrossAttention (attn2), if known."""
    if kind == "block":
        width = getattr(module, "in_channels", None)
        return int(width) if width is not None else None
    out = getattr(module, "to_out", None)
    first = out[0] if isinstance(out, nn.Sequential | list | tuple) and len(out) else out
    weight = getattr(first, "weight", None)
    return int(weight.shape[0]) if weight is not None else None


def resolve_targets(
    model_patcher: Any, saes: Mapping[str, Any], key_map: Mapping[str, str] | None = None
) -> dict[str, ComfyTarget]:
    """Map and check every hookpoint of ``saes`` (path → SparseAutoencoder) on ``model_patcher``."""
    family = model_family(model_patcher)
    if key_map is None:
        unet_config = getattr(getattr(model_patcher.model, "model_config", None), "unet_config", None)
        if not unet_config or "num_res_blocks" not in unet_config:
            raise IncompatibleBundleError(
                "this model is not a ComfyUI UNet (SD 1.x / 2.x / XL): the SAeUron nodes cannot patch it"
            )
        key_map = diffusers_key_map(unet_config)
    targets = {}
    for path, sae in saes.items():
        check_family(getattr(sae.cfg, "model_family", None), family, path)
        target = map_hookpoint(path, key_map, family)
        width = module_width(model_patcher.get_model_object(target.module_path), target.kind)
        if width is not None and width != sae.d_in:
            raise IncompatibleBundleError(
                f"the SAE for {path} reads {sae.d_in}-wide activations, but this model's {path} "
                f"({target.module_path.removeprefix('diffusion_model.')}) is {width} wide: the bundle was "
                "made for another model"
            )
        targets[path] = target
    return targets


# ------------------------------------------------------------------------------------ time / rows
class SigmaClock:
    """σ → τ through the model's ``model_sampling``, and the start/end percent window on σ."""

    def __init__(self, model_sampling: Any, start_percent: float = 0.0, end_percent: float = 1.0) -> None:
        if not 0.0 <= start_percent <= end_percent <= 1.0:
            raise ValueError(
                f"need 0 <= start_percent <= end_percent <= 1, got {start_percent}, {end_percent}"
            )
        self.model_sampling = model_sampling
        self.start_percent, self.end_percent = float(start_percent), float(end_percent)
        self.sigma_start = float(model_sampling.percent_to_sigma(self.start_percent))
        self.sigma_end = float(model_sampling.percent_to_sigma(self.end_percent))
        scale = getattr(model_sampling, "num_timesteps", None) or getattr(model_sampling, "multiplier", None)
        self.scale = float(scale) if scale else 1.0

    def __deepcopy__(self, memo: dict[int, Any]) -> SigmaClock:
        return self

    def tau(self, sigmas: Tensor) -> Tensor:
        """τ ∈ [0, 1] per σ (CPU float32): ``model_sampling.timestep(σ) / num_timesteps``."""
        t = self.model_sampling.timestep(sigmas)
        return (t.detach().float().cpu() / self.scale).clamp_(0.0, 1.0).reshape(-1)

    def active(self, sigmas: Tensor) -> Tensor:
        """Rows whose σ lies inside the percent window (CPU bool)."""
        s = sigmas.detach().float().cpu().reshape(-1)
        return (s <= self.sigma_start) & (s >= self.sigma_end)


def row_sigmas(sigmas: Tensor | float, batch: int) -> Tensor:
    """σ per activation row: ComfyUI passes one σ per latent image; chunks repeat the latent batch."""
    s = torch.as_tensor(sigmas).detach().reshape(-1)
    if s.numel() == batch:
        return s
    if s.numel() and batch % s.numel() == 0:
        return s.repeat(batch // s.numel())
    return s[:1].expand(batch)


def cond_rows(cond_or_uncond: Sequence[int] | None, batch: int) -> Tensor | None:
    """[B] bool, True for conditional rows, from the chunk list; None when the layout is unknown."""
    if not cond_or_uncond or batch % len(cond_or_uncond):
        return None
    per = batch // len(cond_or_uncond)
    flags = torch.tensor([int(c) == 0 for c in cond_or_uncond], dtype=torch.bool)
    return flags.repeat_interleave(per)


class PatchSite:
    """One hookpoint's edit: τ, CFG rows and the percent window from ``transformer_options``.

    The core :class:`~saeuron_plugin.sae.sites.Editor`, ``editor(tokens [B, T, C], ctx) -> tokens``
    (a ``FeatureAblator`` or a recorder), with ``ctx.tau`` from σ and ``ctx.cond_mask`` from
    ``cond_or_uncond``. Returning the input object means "unchanged". The editor follows the
    activations' device.
    """

    def __init__(self, target: ComfyTarget, editor: Any, clock: SigmaClock) -> None:
        self.target = target
        self.editor = editor
        self.clock = clock
        self.calls = 0
        self.edited_calls = 0
        self._warned = False
        sae = getattr(editor, "sae", None)
        self._device: torch.device | None = sae.device if sae is not None else None

    def __deepcopy__(self, memo: dict[int, Any]) -> PatchSite:
        return self

    def to(self, *args: Any, **kwargs: Any) -> PatchSite:
        """Move the editor to a device (dtypes ignored: SAE math stays fp32); returns self."""
        if sys.is_finalizing():  # ModelPatcher.__del__ at interpreter exit
            return self
        device = kwargs.get("device")
        for arg in args:
            if isinstance(arg, torch.device | str | int):
                device = arg
        if device is not None and hasattr(self.editor, "to"):
            self.editor.to(torch.device(device))
            self._device = torch.device(device)
        return self

    def _follow(self, x: Tensor) -> None:
        """Move the editor to ``x``'s device when it (or its SAE, which other editors share) is elsewhere."""
        if not hasattr(self.editor, "to"):
            return
        sae = getattr(self.editor, "sae", None)
        if self._device != x.device or (sae is not None and sae.device != x.device):
            self.editor.to(x.device)
            self._device = x.device

    def edit(self, tokens: Tensor, options: Mapping[str, Any]) -> Tensor:
        self.calls += 1
        sigmas = options.get("sigmas")
        if sigmas is None:
            if not self._warned:
                self._warned = True
                log.warning(
                    "SAeUron: %s called without transformer_options['sigmas']; left unedited "
                    "(the model was run outside ComfyUI's sampler)",
                    self.target.hookpoint,
                )
            return tokens
        batch = tokens.shape[0]
        sig = row_sigmas(sigmas, batch)
        active = self.clock.active(sig)
        if not bool(active.any()):
            return tokens
        tau = self.clock.tau(sig)
        tau_arg: Tensor | float = float(tau[0]) if bool((tau == tau[0]).all()) else tau
        mask = cond_rows(options.get("cond_or_uncond"), batch)
        self._follow(tokens)
        self.edited_calls += 1
        if bool(active.all()):
            return self.editor(tokens, CallContext(tau_arg, mask))
        rows = active.nonzero().flatten().to(tokens.device)
        sub_tau = tau[active] if isinstance(tau_arg, Tensor) else tau_arg
        sub_mask = None if mask is None else mask[active]
        edited = self.editor(tokens[rows], CallContext(sub_tau, sub_mask))
        out = tokens.clone()
        out[rows] = edited.to(tokens.dtype)
        return out


# ---------------------------------------------------------------------------------- patch objects
class Attn2OutputPatch:
    """``set_model_attn2_output_patch`` callable editing one cross-attention output ``n`` [B, HW, C]."""

    def __init__(self, site: PatchSite) -> None:
        if site.target.kind != "attn2":
            raise ValueError(f"{site.target.hookpoint} is not an attn2 hookpoint")
        self.site = site
        self.block = tuple(site.target.block)
        self.block_index = site.target.block_index

    def __call__(self, n: Tensor, extra_options: Mapping[str, Any]) -> Tensor:
        block = extra_options.get("block")
        if (
            block is None
            or tuple(block) != self.block
            or extra_options.get("block_index", 0) != self.block_index
        ):
            return n
        return self.site.edit(n, extra_options)

    def __deepcopy__(self, memo: dict[int, Any]) -> Attn2OutputPatch:
        return self

    def to(self, *args: Any, **kwargs: Any) -> Attn2OutputPatch:
        self.site.to(*args, **kwargs)
        return self

    def __repr__(self) -> str:
        return f"SAeUronAttn2OutputPatch({self.site.target.hookpoint} @ {self.block}[{self.block_index}])"


class BlockWrapperMixin(nn.Module):
    """Behaviour of the block wrapper; :func:`wrap_block` makes a subclass of the wrapped block's class.

    The wrapper shares the wrapped module's ``_modules`` / ``_parameters`` / ``_buffers`` dicts (same
    paths, weight keys and device moves as the original) and keeps the original and the edit site
    outside the module tree. Attribute reads it does not have fall through to the original.
    """

    _saeuron_base: type

    def __init__(self, inner: nn.Module, site: PatchSite) -> None:  # no base __init__: no new weights
        nn.Module.__init__(self)
        self.__dict__["_modules"] = inner._modules
        self.__dict__["_parameters"] = inner._parameters
        self.__dict__["_buffers"] = inner._buffers
        self.__dict__["_saeuron_inner"] = inner
        self.__dict__["_saeuron_site"] = site
        self.training = inner.training

    def __getattr__(self, name: str) -> Any:
        try:
            return nn.Module.__getattr__(self, name)
        except AttributeError:
            inner = self.__dict__.get("_saeuron_inner")
            if inner is None:
                raise
            return getattr(inner, name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        out = self._saeuron_inner(*args, **kwargs)
        options = kwargs.get("transformer_options")
        if options is None:
            options = args[2] if len(args) > 2 else {}
        if not isinstance(out, Tensor) or out.dim() != 4:
            raise TypeError(f"SAeUron block wrapper expected a [B, C, H, W] output, got {type(out).__name__}")
        b, c, h, w = out.shape
        tokens = out.permute(0, 2, 3, 1).reshape(b, h * w, c)
        edited = self._saeuron_site.edit(tokens, options)
        if edited is tokens:
            return out
        return edited.to(out.dtype).reshape(b, h, w, c).permute(0, 3, 1, 2).contiguous()

    def __deepcopy__(self, memo: dict[int, Any]) -> BlockWrapperMixin:
        return self

    def extra_repr(self) -> str:
        return f"SAeUron edit at {self._saeuron_site.target.hookpoint}"


_WRAPPER_CLASSES: dict[type, type] = {}


def wrap_block(inner: nn.Module, site: PatchSite) -> nn.Module:
    """A wrapper module around ``inner`` (a SpatialTransformer) that edits its output with ``site``."""
    base = getattr(type(inner), "_saeuron_base", type(inner))
    if any(c.__name__ == "SpatialVideoTransformer" for c in base.__mro__):
        raise IncompatibleBundleError(f"{site.target.module_path} is a video transformer; not supported")
    cls = _WRAPPER_CLASSES.get(base)
    if cls is None:
        cls = type(
            f"SAeUron{base.__name__}",
            (BlockWrapperMixin, base),
            {"_saeuron_base": base, "__module__": __name__},
        )
        _WRAPPER_CLASSES[base] = cls
    return cls(inner, site)


class SaeHolder:
    """Sits in ``transformer_options["patches"][PATCH_LIST_NAME]`` so ComfyUI moves block-wrapper SAEs.

    ComfyUI calls ``model_patches_to(load_device)`` before sampling and ``(offload_device)`` after
    for every patch list; object patches get no such call. The UNet never reads this list.
    """

    def __init__(self, sites: Sequence[PatchSite]) -> None:
        self.sites = list(sites)

    def __deepcopy__(self, memo: dict[int, Any]) -> SaeHolder:
        return self

    def to(self, *args: Any, **kwargs: Any) -> SaeHolder:
        for site in self.sites:
            site.to(*args, **kwargs)
        return self


def install(
    model_patcher: Any, editors: Mapping[str, Any], targets: Mapping[str, ComfyTarget], clock: SigmaClock
) -> list[PatchSite]:
    """Patch ``model_patcher`` (already a clone) with one edit site per hookpoint; returns the sites."""
    sites, block_sites = [], []
    for path, editor in editors.items():
        target = targets[path]
        site = PatchSite(target, editor, clock)
        if target.kind == "block":
            current = model_patcher.get_model_object(target.module_path)
            model_patcher.add_object_patch(target.module_path, wrap_block(current, site))
            block_sites.append(site)
        else:
            model_patcher.set_model_attn2_output_patch(Attn2OutputPatch(site))
        sites.append(site)
    if block_sites:
        model_patcher.set_model_patch(SaeHolder(block_sites), PATCH_LIST_NAME)
    return sites


__all__ = [
    "Attn2OutputPatch",
    "BlockWrapperMixin",
    "ComfyTarget",
    "IncompatibleBundleError",
    "PatchSite",
    "SaeHolder",
    "SigmaClock",
    "check_family",
    "cond_rows",
    "diffusers_key_map",
    "install",
    "map_hookpoint",
    "model_family",
    "module_width",
    "parse_concepts",
    "resolve_targets",
    "row_sigmas",
    "valid_hookpoints",
    "wrap_block",
]
