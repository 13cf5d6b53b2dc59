"""ComfyUI adapter contract, without ComfyUI: node ids and schemas, patch signatures and semantics,
``clone()`` / ``.to()`` behaviour and error messages, against small fakes of the ComfyUI objects.

The fakes mimic exactly what the adapter relies on (checked against ComfyUI 0.3.75 by
tests/test_comfyui_nodes.py): ``ModelPatcher.clone`` deep-copies ``model_options`` and copies
``object_patches``; ``get_model_object`` sees object patches first; ``model_sampling.timestep(σ)``
is the nearest training step in log σ; ``percent_to_sigma(0) = 1e9``, ``(1) = 0``.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from torch import nn

from saeuron_plugin import SAeUron
from saeuron_plugin.comfyui import core, nodes_v1, patching, specs
from saeuron_plugin.comfyui.patching import (
    Attn2OutputPatch,
    IncompatibleBundleError,
    PatchSite,
    SigmaClock,
    cond_rows,
    map_hookpoint,
    parse_concepts,
    row_sigmas,
    wrap_block,
)
from saeuron_plugin.sae.ablation import ConceptAblation, FeatureAblator
from saeuron_plugin.sae.concepts import TauGrid, UnknownConceptError
from saeuron_plugin.sae.model import SaeConfig, SparseAutoencoder

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parent.parent
D = 16
BLOCK = "unet.up_blocks.1.attentions.1"
ATTN = "unet.up_blocks.1.attentions.1.transformer_blocks.0.attn2"
# What comfy.utils.unet_to_diffusers gives for these modules of an SD 1.x UNet (a few keys).
_T = "transformer_blocks.0.attn2"
KEY_MAP = {
    "up_blocks.1.attentions.1.norm.weight": "output_blocks.4.1.norm.weight",
    "up_blocks.1.attentions.1.proj_in.weight": "output_blocks.4.1.proj_in.weight",
    f"up_blocks.1.attentions.1.{_T}.to_q.weight": f"output_blocks.4.1.{_T}.to_q.weight",
    f"up_blocks.1.attentions.1.{_T}.to_out.0.weight": f"output_blocks.4.1.{_T}.to_out.0.weight",
    "down_blocks.0.attentions.0.norm.weight": "input_blocks.1.1.norm.weight",
    "mid_block.attentions.0.norm.weight": "middle_block.1.norm.weight",
    f"mid_block.attentions.0.{_T}.to_q.weight": f"middle_block.1.{_T}.to_q.weight",
}


# ------------------------------------------------------------------------------------- fakes
class FakeModelSampling:
    """ComfyUI's ModelSamplingDiscrete arithmetic (scaled-linear betas, 1000 steps)."""

    def __init__(self) -> None:
        betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
        ac = torch.cumprod(1 - betas, 0)
        self.sigmas = (((1 - ac) / ac) ** 0.5).float()
        self.num_timesteps = 1000

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        d = sigma.log().reshape(-1, 1) - self.sigmas.log().reshape(1, -1)
        return d.abs().argmin(-1).reshape(sigma.shape)

    def percent_to_sigma(self, p: float) -> float:
        if p <= 0:
            return 999999999.9
        if p >= 1:
            return 0.0
        return float(self.sigmas[round((1 - p) * 999)])


class SD15:  # named like ComfyUI's model config class: the family is read from the class name
    def __init__(self) -> None:
        self.unet_config = {"num_res_blocks": [1, 1]}


class SDXL(SD15):
    pass


class FakeAttention(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.to_q = nn.Linear(width, width)
        self.to_out = nn.Sequential(nn.Linear(width, width))


class FakeSpatialTransformer(nn.Module):
    """Shape of ComfyUI's SpatialTransformer: [B, C, H, W] → [B, C, H, W] with a residual."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.in_channels = width
        self.norm = nn.GroupNorm(4, width)
        self.proj_in = nn.Conv2d(width, width, 1)
        block = nn.Module()
        block.attn2 = FakeAttention(width)
        self.transformer_blocks = nn.ModuleList([block])
        self.register_buffer("scale", torch.ones(()))

    def forward(self, x, context=None, transformer_options={}):  # noqa: B006  (ComfyUI's signature)
        return x + self.proj_in(self.norm(x)) * self.scale


class FakeUNet(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.input_blocks = nn.ModuleList(
            [nn.Sequential(nn.Identity()), nn.Sequential(nn.Identity(), FakeSpatialTransformer(width))]
        )
        self.middle_block = nn.Sequential(nn.Identity(), FakeSpatialTransformer(width))
        self.output_blocks = nn.ModuleList(
            [nn.Sequential(nn.Identity()) for _ in range(4)]
            + [nn.Sequential(nn.Identity(), FakeSpatialTransformer(width))]
        )


class FakeBaseModel(nn.Module):
    def __init__(self, width: int, config: type = SD15) -> None:
        super().__init__()
        self.diffusion_model = FakeUNet(width)
        self.model_sampling = FakeModelSampling()
        self.model_config = config()


class FakePatcher:
    """The part of comfy.model_patcher.ModelPatcher the adapter uses."""

    def __init__(self, model: FakeBaseModel) -> None:
        self.model = model
        self.object_patches: dict = {}
        self.model_options: dict = {"transformer_options": {}}

    def clone(self) -> FakePatcher:
        n = FakePatcher(self.model)
        n.object_patches = self.object_patches.copy()
        n.model_options = copy.deepcopy(self.model_options)
        return n

    def get_model_object(self, name: str):
        if name in self.object_patches:
            return self.object_patches[name]
        obj = self.model
        for part in name.split("."):
            obj = getattr(obj, part)
        return obj

    def add_object_patch(self, name, obj) -> None:
        self.object_patches[name] = obj

    def set_model_patch(self, patch, name) -> None:
        patches = self.model_options["transformer_options"].setdefault("patches", {})
        patches[name] = [*patches.get(name, []), patch]

    def set_model_attn2_output_patch(self, patch) -> None:
        self.set_model_patch(patch, "attn2_output_patch")

    def patches(self, name):
        return self.model_options["transformer_options"].get("patches", {}).get(name, [])


# ------------------------------------------------------------------------------------ bundles
def random_sae(d_in: int = D, n: int = 64, k: int = 4, seed: int = 0, **cfg) -> SparseAutoencoder:
    torch.manual_seed(seed)
    sae = SparseAutoencoder(SaeConfig(d_in=d_in, num_latents=n, k=k, **cfg))
    with torch.no_grad():
        sae.encoder.bias.normal_(0, 0.1)
    return sae


def make_bundle(paths=(BLOCK, ATTN), d_in: int = D, family: str | None = "sd1") -> SAeUron:
    """Concept "red" plants +3 on dimension 0, "blue" on dimension 1 (statistics over τ ∈ [0, 1])."""
    bundle = SAeUron.from_saes(
        {p: random_sae(d_in, seed=i, model_family=family) for i, p in enumerate(paths)}, tau_grid=TauGrid(10)
    )
    gen = torch.Generator().manual_seed(1)
    for entry in bundle.hookpoints.values():
        for name, dim in (("red", 0), ("blue", 1)):
            for _ in range(6):
                x = torch.randn(4, 8, d_in, generator=gen)
                x[..., dim] += 3
                entry.library.accumulate_activations(name, entry.sae, x, torch.rand(4, generator=gen))
    return bundle


@pytest.fixture(scope="module")
def bundle() -> SAeUron:
    return make_bundle()


def concept_tokens(batch: int = 2, tokens: int = 16, seed: int = 3) -> torch.Tensor:
    x = torch.randn(batch, tokens, D, generator=torch.Generator().manual_seed(seed))
    x[:, ::2, 0] += 3
    return x


def options(sigma: float, cond_or_uncond=(0,), batch: int = 1, **extra) -> dict:
    return {"sigmas": torch.full((batch,), sigma), "cond_or_uncond": list(cond_or_uncond), **extra}


# ------------------------------------------------------------------------------ ids and schemas
def test_node_ids_inputs_and_outputs_are_stable():
    table = {
        s.node_id: ([(p.name, p.kind, p.optional) for p in s.inputs], [p.kind for p in s.outputs])
        for s in specs.NODES
    }
    assert table == {
        "SAeUronSAELoader": ([("bundle", "COMBO", False), ("repo_id", "STRING", True)], ["SAEURON_SAE"]),
        "SAeUronUnlearnConcepts": (
            [
                ("model", "MODEL", False),
                ("sae", "SAEURON_SAE", False),
                ("concepts", "STRING", False),
                ("strength", "FLOAT", False),
                ("start_percent", "FLOAT", False),
                ("end_percent", "FLOAT", False),
                ("apply_to", "COMBO", True),
            ],
            ["MODEL"],
        ),
        "SAeUronListConcepts": ([("sae", "SAEURON_SAE", False)], ["STRING", "STRING"]),
        "SAeUronConceptDetector": (
            [
                ("model", "MODEL", False),
                ("sae", "SAEURON_SAE", False),
                ("positive", "CONDITIONING", False),
                ("latent", "LATENT", False),
                ("concepts", "STRING", False),
                ("steps", "INT", False),
                ("seed", "INT", False),
                ("mode", "COMBO", False),
            ],
            ["STRING", "STRING"],
        ),
    }
    for s in specs.NODES:  # V3 wants distinct input and output ids
        assert not {p.name for p in s.inputs} & {p.name for p in s.outputs}
        assert s.node_id in specs.RUNNERS
    assert specs.SAE_TYPE == "SAEURON_SAE" and specs.CATEGORY == "SAeUron"


@pytest.fixture
def fake_folder_paths(tmp_path, monkeypatch):
    """A stand-in for ComfyUI's folder_paths module (models dir in tmp_path)."""
    fp = types.ModuleType("folder_paths")
    fp.models_dir = str(tmp_path / "models")
    fp.supported_pt_extensions = {".safetensors", ".pt"}
    fp.folder_names_and_paths = {}

    def get_folder_paths(name):
        return list(fp.folder_names_and_paths[name][0])

    def get_filename_list(name):
        out = []
        for root in get_folder_paths(name):
            root_p = Path(root)
            out += [
                str(p.relative_to(root_p))
                for p in root_p.rglob("*")
                if p.suffix in fp.folder_names_and_paths[name][1]
            ]
        return sorted(out)

    fp.get_folder_paths, fp.get_filename_list = get_folder_paths, get_filename_list
    monkeypatch.setitem(sys.modules, "folder_paths", fp)
    return fp


def test_v1_adapters_from_the_same_table(fake_folder_paths, bundle):
    for node_id, cls in nodes_v1.NODE_CLASS_MAPPINGS.items():
        spec = next(s for s in specs.NODES if s.node_id == node_id)
        inputs = cls.INPUT_TYPES()
        assert list(inputs["required"]) == [p.name for p in spec.inputs if not p.optional]
        assert list(inputs.get("optional", {})) == [p.name for p in spec.inputs if p.optional]
        assert tuple(p.kind for p in spec.outputs) == cls.RETURN_TYPES
        assert cls.FUNCTION == "execute" and callable(getattr(cls, cls.FUNCTION))
        assert cls.CATEGORY == "SAeUron" and spec.output_node == cls.OUTPUT_NODE
        json.dumps(inputs)  # what /object_info serialises
    loader = nodes_v1.NODE_CLASS_MAPPINGS["SAeUronSAELoader"].INPUT_TYPES()
    assert loader["required"]["bundle"][0] == [core.NO_BUNDLE]
    assert nodes_v1.NODE_DISPLAY_NAME_MAPPINGS["SAeUronUnlearnConcepts"] == "Unlearn Concepts (SAeUron)"
    out = nodes_v1.NODE_CLASS_MAPPINGS["SAeUronListConcepts"]().execute(sae=bundle)
    assert out["result"][0] == "red, blue" and out["ui"]["text"] == [out["result"][1]]


def test_sae_folder_registration_and_bundle_listing(fake_folder_paths, tmp_path, monkeypatch):
    core.register_sae_folder()
    core.register_sae_folder()  # idempotent
    paths, exts = fake_folder_paths.folder_names_and_paths["sae"]
    assert paths == [str(tmp_path / "models" / "sae")] and ".safetensors" in exts
    make_bundle().save_pretrained(tmp_path / "models" / "sae" / "styles")
    single = tmp_path / "models" / "sae" / BLOCK
    random_sae(hookpoint=BLOCK).save_pretrained(single)
    assert core.list_bundles() == ["styles", BLOCK]
    assert core.bundle_path("styles") == tmp_path / "models" / "sae" / "styles"
    loaded = core.load_bundle("styles")
    assert set(loaded.hookpoints) == {BLOCK, ATTN} and loaded.concepts == ["red", "blue"]
    assert list(core.load_bundle(BLOCK).hookpoints) == [BLOCK]
    with pytest.raises(ValueError, match="choose a bundle"):
        core.load_bundle(core.NO_BUNDLE)
    # a repo id (or a local folder) overrides the combo; offline, a Hub id fails with the reason
    by_path = core.load_bundle(core.NO_BUNDLE, repo_id=str(tmp_path / "models" / "sae" / "styles"))
    assert by_path.concepts == ["red", "blue"]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from saeuron_plugin.sae.io import SaeLoadError

    with pytest.raises(SaeLoadError, match="HF_HUB_OFFLINE"):
        core.load_bundle("styles", repo_id="someone/not-cached-bundle")
    with pytest.raises(FileNotFoundError, match="no SAE bundle folder 'nope'"):
        core.load_bundle("nope")
    assert core.bundle_names_from_files(["a/b/c/sae.safetensors", "x/sae.safetensors", "y/w.pt"]) == [
        "a/b",
        "x",
    ]


def test_root_init_is_inert_outside_comfyui():
    code = (
        "import importlib.util, sys; before = list(sys.path); "
        f"spec = importlib.util.spec_from_file_location('saeuron_pack', {str(ROOT / '__init__.py')!r}); "
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); "
        "names = [n for n in ('comfy_entrypoint', 'NODE_CLASS_MAPPINGS') if hasattr(m, n)]; "
        "heavy = [n for n in ('torch', 'saeuron_plugin', 'comfy') if n in sys.modules]; "
        "print(names, heavy, sys.path == before)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/", check=True)
    assert out.stdout.strip() == "[] [] True"


# --------------------------------------------------------------------------------- parsing / mapping
def test_parse_concepts():
    assert parse_concepts(" striped, star ,,\nred, star ") == ["striped", "star", "red"]
    assert parse_concepts(["a", " b", ""]) == ["a", "b"]
    assert parse_concepts("") == [] and parse_concepts(None) == []


def test_hookpoint_mapping_from_key_map():
    t = map_hookpoint(BLOCK, KEY_MAP)
    assert (t.kind, t.module_path, t.block, t.block_index) == (
        "block",
        "diffusion_model.output_blocks.4.1",
        ("output", 4),
        None,
    )
    t = map_hookpoint(ATTN, KEY_MAP)
    assert (t.kind, t.module_path, t.block, t.block_index) == (
        "attn2",
        "diffusion_model.output_blocks.4.1.transformer_blocks.0.attn2",
        ("output", 4),
        0,
    )
    assert map_hookpoint("unet.down_blocks.0.attentions.0", KEY_MAP).block == ("input", 1)
    assert map_hookpoint("unet.mid_block.attentions.0.transformer_blocks.0.attn2", KEY_MAP).block == (
        "middle",
        0,
    )
    with pytest.raises(IncompatibleBundleError, match=r"does not exist in this SDXL model.*up_blocks\.1"):
        map_hookpoint("unet.up_blocks.0.attentions.1", KEY_MAP, "sdxl")
    with pytest.raises(IncompatibleBundleError, match="not a UNet module"):
        map_hookpoint("transformer.transformer_blocks.3", KEY_MAP)
    with pytest.raises(IncompatibleBundleError, match="not this module"):
        map_hookpoint("unet.up_blocks.1.attentions.1.transformer_blocks.0.attn1", KEY_MAP)


# ------------------------------------------------------------------------------------ time / rows
def test_sigma_clock_matches_diffusers_timesteps():
    ms = FakeModelSampling()
    clock = SigmaClock(ms)
    t = torch.tensor([1, 101, 501, 901, 999])
    assert torch.equal(clock.tau(ms.sigmas[t]), t.float() / 1000)  # the same buckets as diffusers' t/1000
    window = SigmaClock(ms, 0.25, 0.5)
    s = ms.sigmas[torch.tensor([999, 800, 700, 600, 400])]
    assert window.active(s).tolist() == [False, False, True, True, False]
    assert SigmaClock(ms).active(s).all()
    with pytest.raises(ValueError):
        SigmaClock(ms, 0.6, 0.5)


def test_rows_from_chunks_any_order():
    assert row_sigmas(torch.tensor([2.0, 3.0]), 4).tolist() == [2.0, 3.0, 2.0, 3.0]  # chunks repeat the batch
    assert row_sigmas(torch.tensor([2.0]), 3).tolist() == [2.0] * 3
    assert cond_rows([1, 0], 4).tolist() == [False, False, True, True]
    assert cond_rows([0, 1], 4).tolist() == [True, True, False, False]
    assert cond_rows([0], 2).tolist() == [True, True]  # uncond skipped (CFG 1) or a separate call
    assert cond_rows([1], 2).tolist() == [False, False]
    assert cond_rows([0, 1], 3) is None and cond_rows(None, 2) is None


# ------------------------------------------------------------------------------------ patch objects
def ablator(bundle, path=ATTN, **kw) -> FeatureAblator:
    entry = bundle.hookpoints[path]
    return FeatureAblator(entry.sae, entry.library, [ConceptAblation("red", strength=5.0)], **kw)


def test_attn2_patch_filters_block_and_index_and_edits_like_the_core(bundle):
    ab = ablator(bundle)
    site = PatchSite(map_hookpoint(ATTN, KEY_MAP), ab, SigmaClock(FakeModelSampling()))
    patch = Attn2OutputPatch(site)
    ms = FakeModelSampling()
    n = concept_tokens(4)
    opts = options(float(ms.sigmas[501]), (1, 0), batch=2, block=("output", 4), block_index=0)
    out = patch(n, opts)
    expected = ab(n, 0.501)
    assert out.shape == n.shape and torch.equal(out, expected) and not torch.equal(out, n)
    for other in (
        {"block": ("output", 5), "block_index": 0},
        {"block": ("output", 4), "block_index": 1},
        {"block": ("input", 4), "block_index": 0},
    ):
        assert patch(n, {**opts, **other}) is n
    assert copy.deepcopy(patch) is patch and patch.to(torch.device("cpu")) is patch
    assert patch.to(torch.float16) is patch and ab.sae.encoder.weight.dtype == torch.float32


@pytest.mark.parametrize("order", [(1, 0), (0, 1)])
def test_cond_only_follows_cond_or_uncond(bundle, order):
    ab = ablator(bundle, apply_to="cond")
    site = PatchSite(map_hookpoint(ATTN, KEY_MAP), ab, SigmaClock(FakeModelSampling()))
    ms = FakeModelSampling()
    n = concept_tokens(4)
    out = site.edit(n, options(float(ms.sigmas[501]), order, batch=2))
    cond = slice(2, 4) if order == (1, 0) else slice(0, 2)
    uncond = slice(0, 2) if order == (1, 0) else slice(2, 4)
    assert torch.equal(out[uncond], n[uncond])
    assert torch.equal(out[cond], ab(n[cond], 0.501))
    # a separate uncond call edits nothing, a separate cond call everything
    assert torch.equal(site.edit(n[:2], options(float(ms.sigmas[501]), (1,), batch=2)), n[:2])
    assert torch.equal(site.edit(n[:2], options(float(ms.sigmas[501]), (0,), batch=2)), ab(n[:2], 0.501))


def test_percent_window_and_missing_sigmas(bundle):
    ab = ablator(bundle)
    ms = FakeModelSampling()
    site = PatchSite(map_hookpoint(ATTN, KEY_MAP), ab, SigmaClock(ms, 0.0, 0.5))
    n = concept_tokens(2)
    late = options(float(ms.sigmas[101]), (0,), batch=2)
    early = options(float(ms.sigmas[901]), (0,), batch=2)
    assert site.edit(n, late) is n
    assert torch.equal(site.edit(n, early), ab(n, 0.901))
    mixed = {"sigmas": torch.stack([ms.sigmas[901], ms.sigmas[101]]), "cond_or_uncond": [0]}
    out = site.edit(n, mixed)
    assert torch.equal(out[0], ab(n[:1], 0.901)[0]) and torch.equal(out[1], n[1])
    assert site.edit(n, {"cond_or_uncond": [0]}) is n  # run outside the sampler: unedited


def test_block_wrapper_is_the_same_module_to_comfyui(bundle):
    block = FakeSpatialTransformer(D)
    entry = bundle.hookpoints[BLOCK]
    ab = FeatureAblator(entry.sae, entry.library, [ConceptAblation("red", strength=5.0)])
    site = PatchSite(map_hookpoint(BLOCK, KEY_MAP), ab, SigmaClock(FakeModelSampling()))
    wrapper = wrap_block(block, site)
    assert isinstance(wrapper, FakeSpatialTransformer) and wrapper.in_channels == D
    assert dict(wrapper.named_parameters()).keys() == dict(block.named_parameters()).keys()
    assert wrapper.state_dict().keys() == block.state_dict().keys()
    assert all(a is b for a, b in zip(wrapper.parameters(), block.parameters()))
    assert not any(p is entry.sae.W_dec for p in wrapper.parameters())  # the SAE stays out of the tree
    assert copy.deepcopy(wrapper) is wrapper
    ms = FakeModelSampling()
    x = concept_tokens(2, 16).reshape(2, 4, 4, D).permute(0, 3, 1, 2).contiguous()
    opts = options(float(ms.sigmas[501]), (0,), batch=2)
    with torch.no_grad():
        out = wrapper(x, None, opts)
        ref = block(x, None, opts)
        tokens = ref.permute(0, 2, 3, 1).reshape(2, 16, D)
        expected = ab(tokens, 0.501).reshape(2, 4, 4, D).permute(0, 3, 1, 2)
    assert torch.equal(out, expected) and not torch.equal(out, ref)
    again = wrap_block(wrapper, site)  # a second Unlearn node on the same block stacks
    assert type(again) is type(wrapper) and isinstance(again, FakeSpatialTransformer)
    wrapper.half()  # moving or casting the model reaches the shared weights, never the SAE
    assert block.proj_in.weight.dtype == torch.float16 and entry.sae.W_dec.dtype == torch.float32
    block.float()


# ------------------------------------------------------------------------------------ the node
def test_unlearn_patches_a_clone_and_survives_clone(bundle):
    model = FakePatcher(FakeBaseModel(D))
    patched = core.unlearn(model, bundle, "red", key_map=KEY_MAP)
    assert model.object_patches == {} and model.patches("attn2_output_patch") == []
    wrapper = patched.object_patches["diffusion_model.output_blocks.4.1"]
    assert (
        isinstance(wrapper, FakeSpatialTransformer)
        and wrapper._saeuron_inner is model.model.diffusion_model.output_blocks[4][1]
    )
    (attn,) = patched.patches("attn2_output_patch")
    (holder,) = patched.patches(patching.PATCH_LIST_NAME)
    again = patched.clone().clone()
    assert (
        again.patches("attn2_output_patch")[0] is attn
        and again.patches(patching.PATCH_LIST_NAME)[0] is holder
    )
    assert again.object_patches["diffusion_model.output_blocks.4.1"] is wrapper
    assert holder.to(torch.device("cpu")) is holder and holder.to(torch.bfloat16) is holder
    # γ = strength × the concept's default γ (−1 here): strength 3 edits like strength=3 in diffusers
    three = core.build_ablators(bundle, "red", strength=3.0)
    assert [a.gamma for a in three[BLOCK].ablations] == [-3.0]
    assert core.unlearn(model, bundle, "", key_map=KEY_MAP).object_patches == {}
    assert core.unlearn(model, bundle, "red", strength=0.0, key_map=KEY_MAP).object_patches == {}


def test_clear_errors_for_bad_inputs(bundle):
    model = FakePatcher(FakeBaseModel(D))
    with pytest.raises(UnknownConceptError, match=r"unknown concept 'green'.*'red', 'blue'"):
        core.unlearn(model, bundle, "red, green", key_map=KEY_MAP)
    wide = make_bundle(d_in=2 * D)
    with pytest.raises(IncompatibleBundleError, match=r"reads 32-wide activations.*16 wide.*another model"):
        core.unlearn(model, wide, "red", key_map=KEY_MAP)
    xl = make_bundle(("unet.up_blocks.0.attentions.1",), family="sdxl")
    with pytest.raises(IncompatibleBundleError, match=r"made for SDXL.*SD 1\.x model"):
        core.unlearn(model, xl, "red", key_map=KEY_MAP)
    xl_unlabelled = make_bundle(("unet.up_blocks.0.attentions.1",), family=None)
    with pytest.raises(IncompatibleBundleError, match=r"up_blocks\.0\.attentions\.1.*does not exist"):
        core.unlearn(model, xl_unlabelled, "red", key_map=KEY_MAP)
    sd1_on_xl = FakePatcher(FakeBaseModel(D, config=SDXL))
    with pytest.raises(IncompatibleBundleError, match=r"made for SD 1\.x.*SDXL model"):
        core.unlearn(sd1_on_xl, bundle, "red", key_map=KEY_MAP)
    with pytest.raises(ValueError, match="start_percent"):
        core.unlearn(model, bundle, "red", start_percent=0.8, end_percent=0.2, key_map=KEY_MAP)
    v1 = nodes_v1.NODE_CLASS_MAPPINGS["SAeUronUnlearnConcepts"]()
    with pytest.raises(UnknownConceptError):
        v1.execute(
            model=model, sae=bundle, concepts="purple", strength=1.0, start_percent=0.0, end_percent=1.0
        )


def test_list_concepts_text(bundle):
    names, info = core.describe_bundle(bundle)
    assert names == "red, blue"
    assert "2 concepts at 2 hookpoints" in info and "red | up_blocks.1.attentions.1" in info


def test_unet_config_from_diffusers_config():
    from saeuron_plugin.comfyui.diffusers_unet import unet_config_from_diffusers

    sd15 = {
        "block_out_channels": [320, 640, 1280, 1280],
        "layers_per_block": 2,
        "attention_head_dim": 8,
        "cross_attention_dim": 768,
        "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
        "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    }
    cfg = unet_config_from_diffusers(sd15)
    # ComfyUI's detected SD 1.5 config
    assert cfg["model_channels"] == 320 and cfg["channel_mult"] == [1, 2, 4, 4]
    assert cfg["num_res_blocks"] == [2, 2, 2, 2] and cfg["transformer_depth"] == [1, 1, 1, 1, 1, 1, 0, 0]
    assert cfg["transformer_depth_output"] == [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0]
    assert cfg["transformer_depth_middle"] == 1 and cfg["context_dim"] == 768
    assert (cfg["num_heads"], cfg["num_head_channels"]) == (8, -1)
    sd2 = {**sd15, "attention_head_dim": [5, 10, 20, 20], "cross_attention_dim": 1024}
    assert (
        unet_config_from_diffusers(sd2)["num_heads"],
        unet_config_from_diffusers(sd2)["num_head_channels"],
    ) == (
        -1,
        64,
    )
    with pytest.raises(ValueError, match="addition_embed_type"):
        unet_config_from_diffusers({**sd15, "addition_embed_type": "text_time"})
