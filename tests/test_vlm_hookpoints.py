"""VLM adapter: hookpoint discovery, token selection and clear errors (tiny offline models)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

torch.set_num_threads(1)

from tiny_vlms import BUILDERS, tiny_llava, tiny_mllama  # noqa: E402

from saeuron_plugin.sae.model import SaeConfig, SparseAutoencoder  # noqa: E402
from saeuron_plugin.vlm.hookpoints import (  # noqa: E402
    HookpointError,
    UnsupportedModelError,
    check_tokens,
    decoder_hookpoint,
    hookpoint_index,
    list_hookpoints,
    resolve_hookpoint,
    to_hidden,
)
from saeuron_plugin.vlm.hooks import HookConflictError, InputTracker, TokenSite, install_sites  # noqa: E402
from saeuron_plugin.vlm.unlearn import SaeWidthError, VLMUnlearner  # noqa: E402

EXPECTED = {
    "llava": {
        "decoder": "model.language_model.layers.",
        "projector": "model.multi_modal_projector",
        "vision": "model.vision_tower.encoder.layers.",
    },
    "qwen2_vl": {
        "decoder": "model.language_model.layers.",
        "projector": "model.visual.merger",
        "vision": "model.visual.blocks.",
    },
    "mllama": {
        "decoder": "model.language_model.layers.",
        "projector": "model.multi_modal_projector",
        "vision": "model.vision_model.transformer.layers.",
    },
    "idefics3": {
        "decoder": "model.text_model.layers.",
        "projector": "model.connector",
        "vision": "model.vision_model.encoder.layers.",
    },
}


@pytest.fixture(scope="module")
def models():
    return {name: build() for name, build in BUILDERS.items()}


@pytest.mark.parametrize("family", list(EXPECTED))
def test_hookpoints_per_family(models, family):
    vlm = models[family]
    index = hookpoint_index(vlm.model)
    assert index.family == family
    for kind, prefix in EXPECTED[family].items():
        paths = index.paths(kind)  # type: ignore[arg-type]
        assert paths and any(p.startswith(prefix) for p in paths), paths
    # every path is a real module path of the top model, with the width its output has
    names = dict(vlm.model.named_modules())
    for path, hp in index.points.items():
        assert names[path] is hp.module
    decoder = index.paths("decoder")
    assert len(decoder) == vlm.model.config.text_config.num_hidden_layers
    assert all(index.points[p].width == 32 for p in decoder)
    assert index.points[EXPECTED[family]["projector"]].width == 32
    assert all(index.points[p].width == 16 for p in index.paths("vision"))
    assert decoder_hookpoint(vlm.model, -1) == decoder[-1]


def test_mllama_vision_lists_and_cross_attention(models):
    index = hookpoint_index(models["mllama"].model)
    assert "model.vision_model.global_transformer.layers.0" in index.points
    cross = [p for p, h in index.points.items() if h.cross_attention]
    assert cross == ["model.language_model.layers.1", "model.language_model.layers.3"]


def test_default_and_invalid_token_modes(models):
    llava, mllama = models["llava"].model, models["mllama"].model
    dec = resolve_hookpoint(llava, "model.language_model.layers.1")
    proj = resolve_hookpoint(llava, "model.multi_modal_projector")
    assert check_tokens(dec, None) == "image" and check_tokens(dec, "text") == "text"
    assert check_tokens(proj, "auto") == "all" and check_tokens(proj, "image") == "all"
    with pytest.raises(ValueError, match="image tokens only"):
        check_tokens(proj, "text")
    with pytest.raises(ValueError, match="tokens must be"):
        check_tokens(dec, "pixels")
    mdec = resolve_hookpoint(mllama, "model.language_model.layers.2")
    assert check_tokens(mdec, None) == "text"
    with pytest.raises(ValueError, match=r"single <\|image\|> token.*cross-attention layers: \[1, 3\]"):
        check_tokens(mdec, "image", mllama)


def test_layer_out_of_range_and_unknown_paths(models):
    model = models["llava"].model
    with pytest.raises(
        HookpointError,
        match=r"layer index 7 is out of range.*has 3 layers.*layers\.0 \.\. "
        r"model\.language_model\.layers\.2",
    ):
        resolve_hookpoint(model, "model.language_model.layers.7")
    with pytest.raises(HookpointError, match="out of range") as err:
        decoder_hookpoint(model, 3)
    assert "0..2" in str(err.value)
    with pytest.raises(
        HookpointError,
        match=r"valid hookpoints: model\.language_model\.layers\.\{0\.\.2\}, "
        r"model\.vision_tower\.encoder\.layers\.\{0\.\.1\}, "
        r"model\.multi_modal_projector",
    ):
        resolve_hookpoint(model, "model.language_model.norm")
    sae = SparseAutoencoder(SaeConfig(d_in=32, num_latents=64, k=4))
    with pytest.raises(HookpointError, match="out of range"):
        VLMUnlearner.from_saes({"model.language_model.layers.9": sae}).check_model(model)


def test_sae_width_mismatch_names_both(models):
    model = models["qwen2_vl"].model
    sae = SparseAutoencoder(SaeConfig(d_in=48, num_latents=96, k=4))
    unlearner = VLMUnlearner.from_saes({"model.visual.blocks.0": sae})
    with pytest.raises(SaeWidthError, match=r"d_in=48.*hidden size 16"):
        unlearner.check_model(model)


def test_unsupported_architectures():
    from transformers import LlamaConfig, LlamaForCausalLM

    text_only = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=32,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
        )
    )
    with pytest.raises(UnsupportedModelError, match=r"model_type='llama'.*supported model types: llava"):
        list_hookpoints(text_only)
    with pytest.raises(UnsupportedModelError, match=r"nn\.Module"):
        list_hookpoints("not a model")
    base = tiny_llava().model.model  # LlavaModel: no generation head
    with pytest.raises(UnsupportedModelError, match="ForConditionalGeneration"):
        list_hookpoints(base)
    sae = SparseAutoencoder(SaeConfig(d_in=16, num_latents=32, k=4))
    with pytest.raises(UnsupportedModelError):
        VLMUnlearner.from_saes({"model.layers.0": sae}).check_model(text_only)


# --------------------------------------------------------------- output layouts and masks
class _TupleLayer(nn.Module):
    """A layer returning a 4.x-style tuple (hidden, attention weights)."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        return x * 1.0, None


class _Toy(nn.Module):
    """A top model with ``config.image_token_id`` whose layer sees [B, T, d] embeddings."""

    def __init__(self) -> None:
        super().__init__()
        self.config = SimpleNamespace(image_token_id=9)
        self.embed = nn.Embedding(16, 4)
        self.layer = _TupleLayer()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.layer(self.embed(input_ids))[0]


def test_to_hidden_tensor_and_tuple():
    x = torch.randn(2, 3, 4)
    h, restore = to_hidden(x)
    assert h is x and restore(h) is x
    out = (x, None, "extra")
    h, restore = to_hidden(out)
    new = restore(h + 1)
    assert isinstance(new, tuple) and len(new) == 3 and torch.equal(new[0], x + 1) and new[2] == "extra"
    with pytest.raises(TypeError, match="cannot find the hidden states"):
        to_hidden({"a": x}, "p")


@pytest.mark.parametrize(
    "mode, expect",
    [
        ("image", [[0, 1, 1, 0], [0, 0, 1, 0]]),
        ("text", [[1, 0, 0, 1], [0, 1, 0, 1]]),
        ("all", [[1, 1, 1, 1], [0, 1, 1, 1]]),
    ],
)
def test_token_site_masks_tuple_outputs_and_padding(mode, expect):
    toy = _Toy()
    ids = torch.tensor([[3, 9, 9, 4], [0, 5, 9, 6]])
    mask = torch.tensor([[1, 1, 1, 1], [0, 1, 1, 1]])
    from saeuron_plugin.vlm.hookpoints import VLMHookpoint

    hp = VLMHookpoint("layer", toy.layer, "decoder", 4, "llava", 0)
    tracker = InputTracker(toy)
    seen = []

    def negate(tokens, ctx):
        seen.append(site.last_mask.clone())
        return -tokens

    site = TokenSite(hp, mode, tracker, negate)
    plain = toy.embed(ids)
    out = toy(ids, attention_mask=mask)
    sel = torch.tensor(expect, dtype=torch.bool)
    assert torch.equal(seen[0], sel)
    assert torch.equal(out[sel], -plain[sel]) and torch.equal(out[~sel], plain[~sel])
    assert not tracker.in_call  # cleared after the call
    with pytest.raises(HookConflictError):
        TokenSite(hp, mode, tracker, negate)
    site.remove()
    tracker.remove()
    assert not toy._forward_hooks and not toy._forward_pre_hooks and not toy.layer._forward_hooks
    assert torch.equal(toy(ids, attention_mask=mask), plain)


def test_install_sites_checks_everything_first(models):
    model = models["llava"].model
    with pytest.raises(HookpointError):
        install_sites(model, {"model.language_model.layers.0": lambda t, ctx: t, "nope": lambda t, ctx: t})
    assert not any(isinstance(h, TokenSite) for m in model.modules() for h in m._forward_hooks.values())
    assert not any(
        isinstance(getattr(h, "__self__", None), InputTracker) for h in model._forward_pre_hooks.values()
    )


def test_mllama_early_layer_warns():
    model = tiny_mllama().model
    sae = SparseAutoencoder(SaeConfig(d_in=32, num_latents=64, k=4))
    with pytest.warns(UserWarning, match="before Mllama's first cross-attention layer"):
        VLMUnlearner.from_saes({"model.language_model.layers.0": sae}).check_model(model)


def test_discovery_on_llava_next_qwen25_smolvlm():
    """Families shared with the layouts above: paths found from tiny configs (no end-to-end run here)."""
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        SmolVLMConfig,
        SmolVLMForConditionalGeneration,
    )

    text = dict(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    vision = dict(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=16,
        patch_size=4,
    )
    nxt = LlavaNextForConditionalGeneration(
        LlavaNextConfig(
            vision_config=CLIPVisionConfig(**vision),
            text_config=LlamaConfig(**text),
            image_token_id=63,
            image_grid_pinpoints=[[16, 16]],
        )
    )
    qwen = Qwen2_5_VLForConditionalGeneration(
        Qwen2_5_VLConfig(
            vision_config=dict(
                depth=2,
                hidden_size=16,
                out_hidden_size=32,
                intermediate_size=32,
                num_heads=2,
                patch_size=4,
                fullatt_block_indexes=[1],
                window_size=8,
            ),
            text_config=dict(
                text,
                rope_parameters={"rope_type": "default", "mrope_section": [2, 1, 1], "rope_theta": 10000.0},
            ),
            image_token_id=63,
        )
    )
    smol = SmolVLMForConditionalGeneration(
        SmolVLMConfig(vision_config=vision, text_config=dict(text, model_type="llama"), image_token_id=63)
    )
    want = {
        "llava_next": (
            nxt,
            "model.language_model.layers.1",
            "model.multi_modal_projector",
            "model.vision_tower.encoder.layers.1",
        ),
        "qwen2_5_vl": (qwen, "model.language_model.layers.1", "model.visual.merger", "model.visual.blocks.1"),
        "smolvlm": (
            smol,
            "model.text_model.layers.1",
            "model.connector",
            "model.vision_model.encoder.layers.1",
        ),
    }
    for family, (model, dec, proj, vis) in want.items():
        index = hookpoint_index(model)
        assert index.family == family
        assert (index.points[dec].kind, index.points[dec].width) == ("decoder", 32)
        assert (index.points[proj].kind, index.points[proj].width) == ("projector", 32)
        assert (index.points[vis].kind, index.points[vis].width) == ("vision", 16)
