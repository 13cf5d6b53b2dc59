"""SAE folders: round trip, sparsify/SAeUron compatibility, the Hub cache offline, clear errors."""

from __future__ import annotations

import json
import os
from pathlib import Path

import huggingface_hub
import pytest
import torch
from safetensors.torch import load_file, save_file

from saeuron_plugin.sae import io as sae_io
from saeuron_plugin.sae.io import (
    SaeLoadError,
    list_hookpoint_folders,
    push_sae_to_hub,
    resolve_repo,
    save_sae,
)
from saeuron_plugin.sae.model import SaeConfig, SparseAutoencoder

load_sae = SparseAutoencoder.from_pretrained  # io.load_sae with the class passed in

HOOK = "unet.up_blocks.1.attentions.1"
SPARSIFY_CFG = {
    "expansion_factor": 4,
    "normalize_decoder": True,
    "num_latents": 0,
    "k": 4,
    "multi_topk": False,
    "batch_topk": True,
    "sample_topk": False,
    "input_unit_norm": False,
    "d_in": 8,
}


def make_sae(d: int = 8, n: int = 32, k: int = 4, **cfg) -> SparseAutoencoder:
    torch.manual_seed(0)
    sae = SparseAutoencoder(SaeConfig(d_in=d, num_latents=n, k=k, **cfg))
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.encoder.bias.normal_(0, 0.1)
        sae.encoder.weight.add_(0.01 * torch.randn_like(sae.encoder.weight))
    return sae


def write_sparsify_folder(folder: Path, cfg: dict | None = None, seed: int = 1) -> dict[str, torch.Tensor]:
    """A folder as sparsify / bcywinski/SAeUron write it, built by hand."""
    cfg = dict(SPARSIFY_CFG if cfg is None else cfg)
    d = cfg["d_in"]
    n = cfg["num_latents"] or d * cfg["expansion_factor"]
    g = torch.Generator().manual_seed(seed)
    tensors = {
        "encoder.weight": torch.randn(n, d, generator=g),
        "encoder.bias": 0.1 * torch.randn(n, generator=g),
        "W_dec": torch.randn(n, d, generator=g),
        "b_dec": torch.randn(d, generator=g),
    }
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "cfg.json").write_text(json.dumps(cfg))
    save_file(tensors, str(folder / "sae.safetensors"))
    return tensors


# ------------------------------------------------------------------------------------ round trip
def test_round_trip_exact(tmp_path):
    sae = make_sae(hookpoint=HOOK, model_family="sd1", extra={"lr": 4e-4, "note": "x"})
    out = save_sae(sae, tmp_path / "sae")
    assert sorted(p.name for p in out.iterdir()) == ["cfg.json", "sae.safetensors"]
    names = set(load_file(str(out / "sae.safetensors")))
    assert names == {"encoder.weight", "encoder.bias", "W_dec", "b_dec"}
    loaded = SparseAutoencoder.from_pretrained(out)
    assert loaded.cfg == sae.cfg
    for name, t in sae.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], t), name
    x = torch.randn(3, 5, 8)
    assert torch.equal(loaded.encode(x), sae.encode(x))
    assert torch.equal(loaded(x).reconstruction, sae(x).reconstruction)
    assert loaded.fingerprint() == sae.fingerprint()
    assert all(p.requires_grad for p in loaded.parameters())


def test_save_pretrained_overwrites_atomically_and_leaves_no_temp_files(tmp_path):
    sae = make_sae()
    sae.save_pretrained(tmp_path)
    with torch.no_grad():
        sae.b_dec.add_(1.0)
    sae.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cfg.json", "sae.safetensors"]
    assert torch.equal(load_sae(tmp_path).b_dec, sae.b_dec)


def test_save_refuses_pickle(tmp_path):
    with pytest.raises(ValueError, match="safetensors"):
        save_sae(make_sae(), tmp_path, safe_serialization=False)


def test_load_dtype_and_device(tmp_path):
    save_sae(make_sae(), tmp_path)
    sae = load_sae(str(tmp_path), dtype=torch.float64, device="cpu")
    assert sae.dtype == torch.float64 and sae.device.type == "cpu"
    assert all(p.dtype == torch.float64 for p in sae.parameters())


# --------------------------------------------------------------------------- sparsify / SAeUron
def test_loads_sparsify_folder_and_matches_manual_math(tmp_path):
    t = write_sparsify_folder(tmp_path / HOOK)
    sae = SparseAutoencoder.from_pretrained(tmp_path, subfolder=HOOK)
    assert (sae.d_in, sae.num_latents, sae.cfg.k) == (8, 32, 4)
    assert sae.cfg.extra["batch_topk"] is True and sae.cfg.extra["normalize_decoder"] is True
    assert sae.cfg.hookpoint == HOOK  # named by its folder

    x = torch.randn(6, 8)
    pre = torch.relu((x - t["b_dec"]) @ t["encoder.weight"].T + t["encoder.bias"])
    vals, idx = pre.topk(4, dim=-1)
    z = torch.zeros_like(pre).scatter_(-1, idx, vals)
    torch.testing.assert_close(sae.encode(x), z)
    torch.testing.assert_close(sae.decode(z), z @ t["W_dec"] + t["b_dec"])

    # Saving again keeps the foreign keys.
    save_sae(sae, tmp_path / "again")
    raw = json.loads((tmp_path / "again" / "cfg.json").read_text())
    assert raw["multi_topk"] is False and raw["d_in"] == 8 and raw["num_latents"] == 32


def test_root_with_hookpoint_folders_asks_for_subfolder(tmp_path):
    for hook in ("unet.up_blocks.1.attentions.10", "unet.up_blocks.1.attentions.2", HOOK):
        write_sparsify_folder(tmp_path / hook)
    (tmp_path / "notes").mkdir()
    assert list_hookpoint_folders(tmp_path) == [
        HOOK,
        "unet.up_blocks.1.attentions.2",
        "unet.up_blocks.1.attentions.10",
    ]
    with pytest.raises(SaeLoadError, match=r"pass subfolder=.*attentions\.1'"):
        load_sae(tmp_path)
    with pytest.raises(SaeLoadError, match=r"no SAE subfolder 'unet.mid_block'.*attentions\.2"):
        load_sae(tmp_path, subfolder="unet.mid_block")


# --------------------------------------------------------------------------------- Hub (offline)
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def make_hub_cache(cache: Path, repo_id: str = "org/name") -> Path:
    """Lay out a Hugging Face cache entry by hand: models--org--name/{refs/main, snapshots/<commit>}."""
    repo_dir = cache / huggingface_hub.file_download.repo_folder_name(repo_id=repo_id, repo_type="model")
    snapshot = repo_dir / "snapshots" / COMMIT
    write_sparsify_folder(snapshot / HOOK)
    write_sparsify_folder(snapshot / "unet.up_blocks.1.attentions.2", seed=2)
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(COMMIT)
    (repo_dir / "blobs").mkdir()
    return snapshot


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def test_hub_repo_from_cache_offline(tmp_path, offline):
    snapshot = make_hub_cache(tmp_path)
    sae = SparseAutoencoder.from_pretrained("org/name", subfolder=HOOK, cache_dir=tmp_path)
    ref = load_sae(snapshot, subfolder=HOOK)
    assert sae.cfg == ref.cfg
    assert all(torch.equal(a, b) for a, b in zip(sae.state_dict().values(), ref.state_dict().values()))
    # Asking for the network anyway: huggingface_hub's own offline mode falls back to the cache.
    assert load_sae("org/name", HOOK, cache_dir=tmp_path, local_files_only=False).cfg == ref.cfg
    # Pinned commit, and the root listing.
    assert load_sae("org/name", HOOK, revision=COMMIT, cache_dir=tmp_path).cfg == ref.cfg
    assert list_hookpoint_folders(resolve_repo("org/name", cache_dir=tmp_path)) == [
        HOOK,
        "unet.up_blocks.1.attentions.2",
    ]
    with pytest.raises(SaeLoadError, match="pass subfolder="):
        load_sae("org/name", cache_dir=tmp_path)
    with pytest.raises(SaeLoadError, match=r"no SAE subfolder 'unet.mid_block' in Hub repo 'org/name'"):
        load_sae("org/name", subfolder="unet.mid_block", cache_dir=tmp_path)


def test_hub_offline_env_only_is_honoured(tmp_path, monkeypatch):
    """HF_HUB_OFFLINE set after huggingface_hub was imported still means: no network."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    make_hub_cache(tmp_path)
    assert load_sae("org/name", HOOK, cache_dir=tmp_path).num_latents == 32
    with pytest.raises(SaeLoadError, match="HF_HUB_OFFLINE is set"):
        load_sae("org/unknown", HOOK, cache_dir=tmp_path)


def test_unknown_repo_offline_is_clear(tmp_path, offline):
    with pytest.raises(
        SaeLoadError,
        match=r"could not find SAE 'org/unknown' locally or in the Hugging Face "
        r"cache .*HF_HUB_OFFLINE is set",
    ):
        SparseAutoencoder.from_pretrained("org/unknown", subfolder=HOOK, cache_dir=tmp_path)


def test_local_files_only_message(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    with pytest.raises(SaeLoadError, match=r"local_files_only=True"):
        load_sae("org/unknown", HOOK, cache_dir=tmp_path, local_files_only=True)


def test_unknown_local_path_is_clear(tmp_path):
    with pytest.raises(SaeLoadError, match=r"no SAE folder at .*does not exist"):
        load_sae(str(tmp_path / "nope"))
    with pytest.raises(SaeLoadError, match=r"no SAE folder at .*does not exist"):
        load_sae(tmp_path / "nope")
    with pytest.raises(SaeLoadError, match=r"no SAE folder at .*does not exist"):
        load_sae("./relative/missing/dir")


# ------------------------------------------------------------------------------------ bad input
@pytest.fixture
def folder(tmp_path) -> Path:
    write_sparsify_folder(tmp_path / "sae")
    return tmp_path / "sae"


def test_error_is_oserror_and_valueerror():
    assert issubclass(SaeLoadError, OSError) and issubclass(SaeLoadError, ValueError)


def test_missing_weights(folder):
    (folder / "sae.safetensors").unlink()
    with pytest.raises(SaeLoadError, match=r"no sae\.safetensors in .*sae"):
        load_sae(folder)


def test_missing_cfg(folder):
    (folder / "cfg.json").unlink()
    with pytest.raises(SaeLoadError, match=r"no cfg\.json in .*: not an SAE folder"):
        load_sae(folder)


def test_path_is_a_file(folder):
    with pytest.raises(SaeLoadError, match="is a file"):
        load_sae(folder / "cfg.json")


@pytest.mark.parametrize("cut", [0, 5, 100, -7])
def test_truncated_weights(folder, cut):
    path = folder / "sae.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:cut])
    with pytest.raises(SaeLoadError, match=r"sae\.safetensors at .* is corrupt or truncated"):
        load_sae(folder)


def test_garbage_weights(folder):
    (folder / "sae.safetensors").write_bytes(os.urandom(256))
    with pytest.raises(SaeLoadError, match="corrupt or truncated"):
        load_sae(folder)


def test_cfg_not_json(folder):
    (folder / "cfg.json").write_text("{d_in: 8,")
    with pytest.raises(SaeLoadError, match=r"cfg\.json at .* is not valid JSON"):
        load_sae(folder)
    (folder / "cfg.json").write_text("[1, 2]")
    with pytest.raises(SaeLoadError, match="must hold a JSON object"):
        load_sae(folder)


@pytest.mark.parametrize(
    ("drop", "message"),
    [
        (("d_in",), "no 'd_in'"),
        (("k",), "no 'k'"),
        (("num_latents", "expansion_factor"), "neither 'num_latents' nor 'expansion_factor'"),
    ],
)
def test_cfg_missing_keys(folder, drop, message):
    raw = dict(SPARSIFY_CFG)
    for key in drop:
        raw.pop(key)
    (folder / "cfg.json").write_text(json.dumps(raw))
    with pytest.raises(SaeLoadError, match=rf"invalid SAE config in .*cfg\.json: .*{message}"):
        load_sae(folder)


def test_cfg_invalid_values(folder):
    (folder / "cfg.json").write_text(json.dumps({**SPARSIFY_CFG, "k": 1000}))
    with pytest.raises(SaeLoadError, match=r"invalid SAE config .*k must be in"):
        load_sae(folder)


def test_shape_mismatch_names_tensor_and_shapes(folder):
    (folder / "cfg.json").write_text(json.dumps({**SPARSIFY_CFG, "expansion_factor": 8}))
    msg = r"tensor 'encoder\.weight' .* shape \[32, 8\] .* implies \[64, 8\]"
    with pytest.raises(SaeLoadError, match=msg):
        load_sae(folder)
    t = load_file(str(folder / "sae.safetensors"))
    t["b_dec"] = torch.zeros(9)
    save_file(t, str(folder / "sae.safetensors"))
    (folder / "cfg.json").write_text(json.dumps(SPARSIFY_CFG))
    with pytest.raises(SaeLoadError, match=r"tensor 'b_dec' .* shape \[9\] .* implies \[8\]"):
        load_sae(folder)


def test_missing_and_unexpected_tensors(folder):
    t = load_file(str(folder / "sae.safetensors"))
    t.pop("b_dec")
    t["W_skip"] = torch.zeros(8, 8)
    save_file(t, str(folder / "sae.safetensors"))
    msg = r"missing tensors \['b_dec'\] and unexpected tensors \['W_skip'\]"
    with pytest.raises(SaeLoadError, match=msg):
        load_sae(folder)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights(folder, bad):
    t = load_file(str(folder / "sae.safetensors"))
    t["W_dec"][3, 1] = bad
    save_file(t, str(folder / "sae.safetensors"))
    with pytest.raises(SaeLoadError, match=r"tensor 'W_dec' .* 1 NaN/inf"):
        load_sae(folder)


def test_integer_weights(folder):
    t = load_file(str(folder / "sae.safetensors"))
    t["b_dec"] = torch.zeros(8, dtype=torch.int32)
    save_file(t, str(folder / "sae.safetensors"))
    with pytest.raises(SaeLoadError, match=r"tensor 'b_dec' .* dtype torch.int32"):
        load_sae(folder)


# ------------------------------------------------------------------------------------------ push
class FakeApi:
    calls: list[tuple[str, dict]] = []

    def __init__(self, token=None):
        self.calls.append(("init", {"token": token}))

    def create_repo(self, repo_id, **kw):
        self.calls.append(("create_repo", {"repo_id": repo_id, **kw}))

    def create_branch(self, repo_id, **kw):
        self.calls.append(("create_branch", {"repo_id": repo_id, **kw}))

    def upload_folder(self, *, folder_path, **kw):
        folder = Path(folder_path)
        files = {p.name: p.read_bytes() for p in folder.iterdir()}
        self.calls.append(("upload_folder", {"files": files, **kw}))

        class Info(str):
            commit_url = f"https://huggingface.co/{kw['repo_id']}/commit/abc"

        return Info("https://huggingface.co/x")


def test_push_to_hub_uploads_the_folder(monkeypatch, tmp_path):
    FakeApi.calls = []
    monkeypatch.setattr(sae_io, "HfApi", FakeApi)
    sae = make_sae(hookpoint=HOOK)
    url = sae.push_to_hub("me/saes", subfolder=HOOK, private=True, token="tok")
    assert url == "https://huggingface.co/me/saes/commit/abc"
    names = [c[0] for c in FakeApi.calls]
    assert names == ["init", "create_repo", "upload_folder"]
    create = FakeApi.calls[1][1]
    assert create["repo_id"] == "me/saes" and create["exist_ok"] is True and create["private"] is True
    upload = FakeApi.calls[2][1]
    assert upload["path_in_repo"] == HOOK and upload["repo_id"] == "me/saes"
    assert HOOK in upload["commit_message"]
    assert sorted(upload["files"]) == ["cfg.json", "sae.safetensors"]
    # What was uploaded loads back to the same SAE.
    for name, data in upload["files"].items():
        (tmp_path / name).write_bytes(data)
    back = load_sae(tmp_path)
    assert back.cfg == sae.cfg and torch.equal(back.W_dec, sae.W_dec)


def test_push_to_hub_revision_creates_branch(monkeypatch):
    FakeApi.calls = []
    monkeypatch.setattr(sae_io, "HfApi", FakeApi)
    push_sae_to_hub(make_sae(), "me/saes", revision="v2", commit_message="msg")
    names = [c[0] for c in FakeApi.calls]
    assert names == ["init", "create_repo", "create_branch", "upload_folder"]
    upload = FakeApi.calls[-1][1]
    assert upload["path_in_repo"] is None and upload["revision"] == "v2" and upload["commit_message"] == "msg"
