"""The embedded default model: a small SD 1.x-shaped text-to-image model trained on ShapesCanvas.

Real SD weights cannot be downloaded everywhere, so the project trains its own: an ``AutoencoderKL``
(x2 down-sampling, 4 latent channels), a ``UNet2DConditionModel`` with SD 1.x block types and names
(``unet.up_blocks.1.attentions.{0,1,2}`` exist) and a ``CLIPTextModel`` with a word-level
``CLIPTokenizer`` built from the caption vocabulary. The exported folder loads with
``StableDiffusionPipeline.from_pretrained`` and no extra code.

Training: VAE first (L1 + MSE + tiny KL), then UNet and text encoder jointly with epsilon prediction,
min-SNR weighting, 10 % empty captions for classifier-free guidance, EMA, and resumable safetensors
checkpoints. Every random draw depends on (seed, step) only, so a resumed run continues as if never
stopped. Held-out synonyms get a "synonym prior" after training (see :func:`apply_synonym_prior`).
"""

from __future__ import annotations

import itertools
import json
import math
import string
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from saeuron_plugin.sae.files import read_json_object, read_safetensors
from saeuron_plugin.shapescanvas import data as sc

DEFAULT_GUIDANCE = 5.0
DEFAULT_STEPS = 25
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
CHARS = string.ascii_lowercase + string.digits + ",.-'!?"


# ----------------------------------------------------------------------------------------------- configs
@dataclass
class ModelConfig:
    """Sizes of the three components (defaults: ~2M-parameter UNet on 16x16x4 latents of 32 px images)."""

    image_size: int = 32
    latent_channels: int = 4
    vae_channels: tuple[int, ...] = (32, 64)
    unet_channels: tuple[int, ...] = (32, 64, 64, 64)
    unet_heads: int = 2
    norm_groups: int = 8
    text_dim: int = 64
    text_layers: int = 3
    text_heads: int = 4
    max_length: int = 16


@dataclass
class TrainConfig:
    """Recipe for :func:`train_default_model`; the defaults reproduce the shipped checkpoint."""

    out: str = "runs/shapescanvas"
    device: str = "cpu"
    seed: int = 0
    vae_steps: int = 2000
    vae_batch: int = 32
    vae_lr: float = 1e-3
    kl_weight: float = 1e-6
    steps: int = 10000  # length of the learning-rate schedule
    # Stop here (0: run the whole schedule). The shipped checkpoint is step 5500 of the 10k schedule
    # (judge accuracy >= 99.7 % per domain there; 95 % / 98 % / 99 % style at steps 3000 / 4000 / 5000).
    stop_at: int = 5500
    batch_size: int = 32
    lr: float = 5e-4
    warmup: int = 250
    weight_decay: float = 1e-2
    min_snr_gamma: float = 5.0
    ema_decay: float = 0.999
    p_empty: float = 0.1
    p_drop: float = 0.1
    train_text_encoder: bool = True
    checkpoint_every: int = 1000
    max_minutes: float = 0.0  # > 0: stop the UNet stage early (and still export) after this long
    eval_every: int = 0  # > 0: call ``eval_fn`` on the EMA pipeline every this many steps
    model: ModelConfig = field(default_factory=ModelConfig)


# -------------------------------------------------------------------------------------------- tokenizer
def _bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """CLIP's BPE on one lower-case word (same rules as ``CLIPTokenizer.bpe``)."""
    parts = [*word[:-1], word[-1] + "</w>"]
    while len(parts) > 1:
        pairs = set(itertools.pairwise(parts))
        best = min(pairs, key=lambda p: ranks.get(p, math.inf))
        if best not in ranks:
            break
        merged, i = [], 0
        while i < len(parts):
            if i < len(parts) - 1 and (parts[i], parts[i + 1]) == best:
                merged.append(parts[i] + parts[i + 1])
                i += 2
            else:
                merged.append(parts[i])
                i += 1
        parts = merged
    return parts


def word_merges(words: Sequence[str]) -> list[tuple[str, str]]:
    """Merge rules under which every word of ``words`` becomes one ``word</w>`` token.

    Rules are appended only when a word gets stuck, at the lowest priority, so earlier words keep
    their single-token encoding.
    """
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for w in words:
        if len(w) < 2:
            continue
        parts = _bpe(w, ranks)
        while len(parts) > 1:
            pair = (parts[0], parts[1])
            ranks[pair] = len(merges)
            merges.append(pair)
            parts = _bpe(w, ranks)
    return merges


def write_tokenizer_files(folder: str | Path) -> Path:
    """Write ``vocab.json`` and ``merges.txt`` of the ShapesCanvas tokenizer into ``folder``.

    Vocabulary: specials, single characters and their ``</w>`` forms (any text still tokenizes), every
    merge product, so each caption word and held-out synonym is exactly one token.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    words = [w for w in sc.caption_words() if all(ch in CHARS for ch in w)]
    merges = word_merges(words)
    vocab = [BOS, EOS, *CHARS, *(c + "</w>" for c in CHARS)]
    for a, b in merges:
        if a + b not in vocab:
            vocab.append(a + b)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, indent=0))
    lines = ["#version: 0.2", *(f"{a} {b}" for a, b in merges)]
    (folder / "merges.txt").write_text("\n".join(lines) + "\n")
    return folder


def build_tokenizer(folder: str | Path, max_length: int = 16):
    """A ``CLIPTokenizer`` whose vocabulary holds every ShapesCanvas word as one token."""
    from transformers import CLIPTokenizer

    folder = write_tokenizer_files(folder)
    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=max_length)
    for w in sc.caption_words():
        ids = tok(w, add_special_tokens=False).input_ids
        if len(ids) != 1:
            raise RuntimeError(f"word {w!r} tokenizes to {ids}; the merge table is inconsistent")
    return tok


# --------------------------------------------------------------------------------------------- builders
def build_vae(mc: ModelConfig):
    """x2 AutoencoderKL: 2 encoder/decoder levels, one ResNet per level, 4 latent channels."""
    from diffusers import AutoencoderKL

    n = len(mc.vae_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=mc.vae_channels,
        layers_per_block=1,
        latent_channels=mc.latent_channels,
        norm_num_groups=mc.norm_groups,
        sample_size=mc.image_size,
    )


def build_unet(mc: ModelConfig):
    """UNet2DConditionModel with SD 1.x block types, two layers per block."""
    from diffusers import UNet2DConditionModel

    factor = 2 ** (len(mc.vae_channels) - 1)
    return UNet2DConditionModel(
        sample_size=mc.image_size // factor,
        in_channels=mc.latent_channels,
        out_channels=mc.latent_channels,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        block_out_channels=mc.unet_channels,
        layers_per_block=2,
        cross_attention_dim=mc.text_dim,
        attention_head_dim=mc.unet_heads,
        norm_num_groups=mc.norm_groups,
    )


def build_text_encoder(mc: ModelConfig, vocab_size: int, bos_id: int, eos_id: int):
    """A small CLIPTextModel (causal transformer) over the ShapesCanvas vocabulary."""
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=mc.text_dim,
        intermediate_size=4 * mc.text_dim,
        num_hidden_layers=mc.text_layers,
        num_attention_heads=mc.text_heads,
        max_position_embeddings=mc.max_length,
        projection_dim=mc.text_dim,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
    )
    return CLIPTextModel(cfg)


def build_scheduler():
    """DDIM with SD 1.x's training schedule (scaled-linear betas 0.00085..0.012, 1000 steps)."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="epsilon",
    )


def build_pipeline(vae, text_encoder, tokenizer, unet):
    """Assemble a StableDiffusionPipeline without safety checker."""
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=build_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


# ------------------------------------------------------------------------------------- checkpoint utils
def _save_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


def _flat_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}


def optimizer_to_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer state into safetensors-compatible tensors and JSON-able metadata."""
    sd = opt.state_dict()
    tensors, meta = {}, {"param_groups": sd["param_groups"], "scalars": {}}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{idx}.{k}"] = v.detach().cpu().contiguous()
            else:
                meta["scalars"][f"{idx}.{k}"] = v
    return tensors, meta


def optimizer_from_tensors(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Inverse of :func:`optimizer_to_tensors`."""
    state: dict[int, dict] = {}
    for key, v in tensors.items():
        idx, k = key.split(".", 1)
        state.setdefault(int(idx), {})[k] = v
    for key, v in meta["scalars"].items():
        idx, k = key.split(".", 1)
        state.setdefault(int(idx), {})[k] = v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


class EMA:
    """Exponential moving average of parameters with the usual (1 + n) / (10 + n) warm-up."""

    def __init__(self, params: Sequence[torch.nn.Parameter], decay: float):
        self.params = list(params)
        self.shadow = [p.detach().clone() for p in self.params]
        self.decay = decay

    @torch.no_grad()
    def update(self, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        torch._foreach_lerp_(self.shadow, [p.detach() for p in self.params], 1 - d)

    @torch.no_grad()
    def copy_to(self, params: Sequence[torch.nn.Parameter]) -> None:
        for s, p in zip(self.shadow, params):
            p.copy_(s)


# ----------------------------------------------------------------------------------------------- VAE
def _cosine(step: int, total: int, warmup: int, floor: float = 0.1) -> float:
    if step < warmup:
        return (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))


def train_vae(tc: TrainConfig, log: Callable[[str], None] = print):
    """Train (or resume/load) the VAE into ``<out>/vae``; sets ``scaling_factor`` = 1 / latent std."""
    from diffusers import AutoencoderKL

    folder = Path(tc.out) / "vae"
    done = folder / "config.json"
    if done.exists():
        log(f"VAE: loading finished stage from {folder}")
        return AutoencoderKL.from_pretrained(folder).to(tc.device)
    dev = torch.device(tc.device)
    torch.manual_seed(tc.seed)
    vae = build_vae(tc.model).to(dev).train()
    opt = torch.optim.AdamW(vae.parameters(), lr=tc.vae_lr, weight_decay=0.0)
    stream = sc.batches(tc.vae_batch, seed=tc.seed + 101, device=dev)
    t0 = time.time()
    for step in range(tc.vae_steps):
        for g in opt.param_groups:
            g["lr"] = tc.vae_lr * _cosine(step, tc.vae_steps, 100)
        x = next(stream).images * 2 - 1
        post = vae.encode(x).latent_dist
        gen = torch.Generator(dev).manual_seed(tc.seed * 1_000_003 + step)
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen, device=dev)
        rec = vae.decode(z).sample
        kl = post.kl().mean() / x[0].numel()
        loss = F.l1_loss(rec, x) + F.mse_loss(rec, x) + tc.kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        if step % 200 == 0 or step == tc.vae_steps - 1:
            log(f"VAE step {step:5d}/{tc.vae_steps} loss {loss.item():.4f} ({time.time() - t0:.0f}s)")
    vae.eval()
    with torch.no_grad():
        x = sc.sample_batch(512, np.random.default_rng([tc.seed, 424242]), dev).images * 2 - 1
        z = vae.encode(x).latent_dist.mean
        mse = F.mse_loss(vae.decode(z).sample, x).item()
        std = z.float().std().item()
    vae.register_to_config(scaling_factor=round(1.0 / std, 5))
    vae.save_pretrained(folder)
    _save_json(
        folder / "train_stats.json",
        {"steps": tc.vae_steps, "recon_mse": mse, "latent_std": std, "seconds": round(time.time() - t0, 1)},
    )
    log(f"VAE done: recon MSE {mse:.5f} (images in [-1, 1]), latent std {std:.3f}")
    return vae


# ---------------------------------------------------------------------------------------------- UNet
def min_snr_weights(alphas_cumprod: torch.Tensor, t: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma loss weights for epsilon prediction: min(SNR, gamma) / SNR."""
    a = alphas_cumprod[t]
    snr = a / (1 - a)
    return torch.clamp(snr, max=gamma) / snr


class _Captions:
    """Caches token ids per caption (the caption set is small)."""

    def __init__(self, tokenizer, device: torch.device):
        self.tok, self.device, self.cache = tokenizer, device, {}

    def __call__(self, captions: Sequence[str]) -> torch.Tensor:
        rows = []
        for c in captions:
            if c not in self.cache:
                ids = self.tok(c, padding="max_length", truncation=True, max_length=self.tok.model_max_length)
                self.cache[c] = ids.input_ids
            rows.append(self.cache[c])
        return torch.tensor(rows, device=self.device)


def train_default_model(
    tc: TrainConfig, log: Callable[[str], None] = print, eval_fn: Callable[[int, object], dict] | None = None
):
    """Train VAE, then UNet + text encoder; return the EMA pipeline (fp32, on ``tc.device``).

    ``eval_fn(step, pipe)`` (with ``tc.eval_every``) measures the EMA weights during training; its
    results are logged and kept in ``<out>/eval_history.json``.
    """
    from tqdm.auto import tqdm

    out = Path(tc.out)
    out.mkdir(parents=True, exist_ok=True)
    _save_json(out / "train_config.json", asdict(tc))
    dev = torch.device(tc.device)
    vae = train_vae(tc, log).to(dev).eval().requires_grad_(False)
    tokenizer = build_tokenizer(out / "tokenizer", tc.model.max_length)
    vocab = tokenizer.get_vocab()
    torch.manual_seed(tc.seed)
    unet = build_unet(tc.model).to(dev).train()
    text = build_text_encoder(tc.model, len(vocab), vocab[BOS], vocab[EOS]).to(dev)
    text.train(tc.train_text_encoder).requires_grad_(tc.train_text_encoder)
    params = list(unet.parameters()) + (list(text.parameters()) if tc.train_text_encoder else [])
    opt = torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay, fused=dev.type == "cuda")
    ema = EMA(params, tc.ema_decay)
    sched = build_scheduler()
    acp = sched.alphas_cumprod.to(dev)
    n_unet = sum(p.numel() for p in unet.parameters())
    n_text = sum(p.numel() for p in text.parameters())
    log(f"UNet {n_unet / 1e6:.2f}M params, text encoder {n_text / 1e6:.2f}M params, vocab {len(vocab)}")

    state_dir = out / "state"
    start = 0
    if (state_dir / "train_state.json").exists():
        meta = read_json_object(state_dir / "train_state.json", "training state")
        unet.load_state_dict(read_safetensors(state_dir / "unet.safetensors", "UNet checkpoint").tensors)
        text_state = read_safetensors(state_dir / "text_encoder.safetensors", "text encoder checkpoint")
        text.load_state_dict(text_state.tensors)
        shadow = read_safetensors(state_dir / "ema.safetensors", "EMA checkpoint").tensors
        ema.shadow = [shadow[str(i)].to(dev) for i in range(len(params))]
        optim = read_safetensors(state_dir / "optimizer.safetensors", "optimizer checkpoint").tensors
        optimizer_from_tensors(opt, optim, meta["optimizer"])
        start = meta["step"]
        log(f"resuming UNet training at step {start}")

    def save_state(step: int) -> None:
        state_dir.mkdir(parents=True, exist_ok=True)
        save_file(_flat_state(unet), str(state_dir / "unet.safetensors"))
        save_file(_flat_state(text), str(state_dir / "text_encoder.safetensors"))
        save_file(
            {str(i): s.detach().cpu().contiguous() for i, s in enumerate(ema.shadow)},
            str(state_dir / "ema.safetensors"),
        )
        tensors, meta = optimizer_to_tensors(opt)
        save_file(tensors, str(state_dir / "optimizer.safetensors"))
        _save_json(state_dir / "train_state.json", {"step": step, "optimizer": meta})

    history: list[dict] = []

    @torch.no_grad()
    def run_eval(step: int) -> None:
        backup = [p.detach().clone() for p in params]
        ema.copy_to(params)
        unet.eval(), text.eval()
        res = {"step": step, **eval_fn(step, build_pipeline(vae, text, tokenizer, unet))}
        for p, b in zip(params, backup):
            p.copy_(b)
        unet.train(), text.train(tc.train_text_encoder)
        history.append(res)
        _save_json(out / "eval_history.json", history)
        log(f"eval at step {step}: {json.dumps(res)}")

    captions = _Captions(tokenizer, dev)
    stream = sc.batches(
        tc.batch_size, seed=tc.seed, device=dev, p_drop=tc.p_drop, p_empty=tc.p_empty, start=start
    )
    t0, done = time.time(), start
    last = min(tc.steps, tc.stop_at) if tc.stop_at > 0 else tc.steps
    bar = tqdm(range(start, last), initial=start, total=last, desc="UNet", mininterval=5)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = tc.lr * _cosine(step, tc.steps, tc.warmup)
        batch = next(stream)
        gen = torch.Generator(dev).manual_seed(tc.seed * 1_000_003 + step)
        with torch.no_grad():
            post = vae.encode(batch.images * 2 - 1).latent_dist
            lat = post.mean + post.std * torch.randn(post.mean.shape, generator=gen, device=dev)
            lat = lat * vae.config.scaling_factor
        noise = torch.randn(lat.shape, generator=gen, device=dev)
        t = torch.randint(0, sched.config.num_train_timesteps, (len(lat),), generator=gen, device=dev)
        noisy = sched.add_noise(lat, noise, t)
        ids = captions(batch.captions)
        ehs = text(ids)[0] if tc.train_text_encoder else text(ids)[0].detach()
        pred = unet(noisy, t, ehs).sample
        per = F.mse_loss(pred.float(), noise, reduction="none").mean(dim=(1, 2, 3))
        loss = (per * min_snr_weights(acp, t, tc.min_snr_gamma)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema.update(step)
        done = step + 1
        if step % 100 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
        if step % 500 == 0:
            log(f"UNet step {step:6d}/{tc.steps} loss {loss.item():.4f} ({time.time() - t0:.0f}s)")
        if done % tc.checkpoint_every == 0:
            save_state(done)
        if eval_fn is not None and tc.eval_every > 0 and done % tc.eval_every == 0:
            run_eval(done)
        if tc.max_minutes > 0 and time.time() - t0 > 60 * tc.max_minutes:
            log(f"stopping at step {done} after {tc.max_minutes} min (--max-minutes)")
            break
    bar.close()
    if done > start:
        save_state(done)
        _save_json(
            out / "unet_stats.json",
            {
                "steps": done,
                "seconds": round(time.time() - t0, 1),
                "s_per_step": (time.time() - t0) / (done - start),
            },
        )
    ema.copy_to(params)
    apply_synonym_prior(text, tokenizer, seed=tc.seed)
    return build_pipeline(vae, text.eval(), tokenizer, unet.eval())


# ----------------------------------------------------------------------------------- synonyms, export
@torch.no_grad()
def apply_synonym_prior(text_encoder, tokenizer, strength: float = 0.3, seed: int = 0) -> None:
    """Give each held-out synonym the embedding of its canonical word plus seeded noise.

    Synonyms never occur in training captions, so their embeddings are untrained. A pretrained CLIP
    knows that "crimson" is close to "red"; this stands in for that knowledge, making paraphrase
    attacks meaningful: the token differs, the meaning mostly not. ``strength`` is the noise norm
    relative to the canonical embedding's norm.
    """
    emb = text_encoder.get_input_embeddings().weight
    vocab = tokenizer.get_vocab()
    gen = torch.Generator().manual_seed(seed + 7)
    for canon, syns in sc.SYNONYMS.items():
        base = emb[vocab[canon + "</w>"]].float().cpu()
        for s in syns:
            noise = torch.randn(base.shape, generator=gen)
            noise = noise / noise.norm() * base.norm() * strength
            emb[vocab[s + "</w>"]] = (base + noise).to(emb)


def export_pipeline(pipe, folder: str | Path, metrics: dict | None = None) -> Path:
    """Save ``pipe`` so that ``StableDiffusionPipeline.from_pretrained(folder)`` loads it offline.

    UNet and VAE weights are fp16 safetensors; the text encoder stays fp32 (0.7 MB) because
    transformers 5 loads weights in their saved dtype while diffusers loads fp32, and mixed dtypes
    would break the default ``from_pretrained`` call. ``vocab.json``/``merges.txt`` are written next
    to ``tokenizer.json`` for transformers 4.x.
    """
    folder = Path(folder)
    pipe.unet.to(torch.float16)
    pipe.vae.to(torch.float16)
    pipe.save_pretrained(folder, safe_serialization=True)
    pipe.unet.to(torch.float32)
    pipe.vae.to(torch.float32)
    write_tokenizer_files(folder / "tokenizer")
    if metrics is not None:
        _save_json(folder / "metrics.json", metrics)
    return folder


# -------------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def generate(
    pipe,
    prompts: Sequence[str],
    seeds: Sequence[int],
    steps: int = DEFAULT_STEPS,
    guidance_scale: float = DEFAULT_GUIDANCE,
    batch_size: int = 256,
) -> torch.Tensor:
    """Images [N, 3, H, W] in [0, 1], one per (prompt, seed), each with its own seeded generator."""
    device = pipe.device
    out = []
    for i in range(0, len(prompts), batch_size):
        chunk, sd = list(prompts[i : i + batch_size]), list(seeds[i : i + batch_size])
        gens = [torch.Generator(device).manual_seed(int(s)) for s in sd]
        res = pipe(
            chunk, num_inference_steps=steps, guidance_scale=guidance_scale, generator=gens, output_type="pt"
        )
        out.append(res.images.float().cpu())
    return torch.cat(out)


@torch.no_grad()
def evaluate_base(
    pipe,
    judges,
    prompts: Sequence[sc.BenchmarkPrompt] | None = None,
    seeds: Sequence[int] = (0,),
    steps: int = DEFAULT_STEPS,
    guidance_scale: float = DEFAULT_GUIDANCE,
    batch_size: int = 256,
) -> dict:
    """Judge accuracy per domain on the untouched model's images for every prompt x seed.

    Default prompts: every object x style x color combination with the training template. Seeds are
    per image (``seed * 100_000 + prompt index``), so results do not depend on batching.
    """
    prompts = list(prompts if prompts is not None else sc.benchmark_prompts())
    texts = [p.prompt for s in seeds for p in prompts]
    img_seeds = [s * 100_000 + i for s in seeds for i in range(len(prompts))]
    t0 = time.time()
    pipe.set_progress_bar_config(disable=True)
    images = generate(pipe, texts, img_seeds, steps, guidance_scale, batch_size)
    pred = judges.classify(images)
    result: dict = {
        "n_images": len(texts),
        "steps": steps,
        "guidance_scale": guidance_scale,
        "seeds": list(seeds),
        "seconds": round(time.time() - t0, 1),
        "accuracy": {},
    }
    for d in sc.DOMAINS:
        target = torch.tensor([p.label(d) for _ in seeds for p in prompts])
        result["accuracy"][d] = round(float((pred[d] == target).float().mean()), 4)
    all_ok = torch.ones(len(texts), dtype=torch.bool)
    for d in sc.DOMAINS:
        all_ok &= pred[d] == torch.tensor([p.label(d) for _ in seeds for p in prompts])
    result["accuracy"]["all_three"] = round(float(all_ok.float().mean()), 4)
    return result


@torch.no_grad()
def vae_judge_accuracy(vae, judges, n: int = 1024, seed: int = 77) -> dict[str, float]:
    """Judge accuracy on VAE reconstructions of fresh generator images (an upper bound for the model)."""
    dev = next(vae.parameters()).device
    batch = sc.sample_batch(n, np.random.default_rng([seed, 31337]), dev)
    dtype = next(vae.parameters()).dtype
    rec = vae.decode(vae.encode((batch.images * 2 - 1).to(dtype)).latent_dist.mean).sample
    return judges.accuracy(((rec.float() + 1) / 2).clamp(0, 1), batch.labels)


def image_grid(images: torch.Tensor, ncol: int):
    """Float images [N, 3, H, W] -> one PIL image, ``ncol`` per row."""
    from PIL import Image

    arr = sc.to_uint8(images)
    n, h, w, _ = arr.shape
    rows = math.ceil(n / ncol)
    grid = np.full((rows * h, ncol * w, 3), 255, np.uint8)
    for i in range(n):
        r, c = divmod(i, ncol)
        grid[r * h : (r + 1) * h, c * w : (c + 1) * w] = arr[i]
    return Image.fromarray(grid)
