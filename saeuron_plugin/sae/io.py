"""Saving and loading SAE folders, locally or through the Hugging Face Hub.

One folder per SAE (per hookpoint), the layout of EleutherAI sparsify and ``bcywinski/SAeUron``::

    <folder>/cfg.json           SaeConfig.to_dict() (foreign keys are kept in ``cfg.extra``)
    <folder>/sae.safetensors    encoder.weight [n, d], encoder.bias [n], W_dec [n, d], b_dec [d]

Only safetensors and JSON are ever read or written (no pickles). Every problem with a folder is
reported as one :class:`SaeLoadError` that names the problem and the path.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from huggingface_hub import HfApi, constants, snapshot_download
from huggingface_hub.errors import (
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..errors import NonFiniteError, SAeUronError
from .config import SaeConfig, SaeConfigError

if TYPE_CHECKING:  # io builds on the config only; the model class is passed in (no io <-> model cycle)
    from .model import SparseAutoencoder

CFG_NAME = "cfg.json"
WEIGHTS_NAME = "sae.safetensors"
TENSOR_NAMES = ("encoder.weight", "encoder.bias", "W_dec", "b_dec")

__all__ = [
    "CFG_NAME",
    "TENSOR_NAMES",
    "WEIGHTS_NAME",
    "SaeLoadError",
    "atomic_write",
    "list_hookpoint_folders",
    "load_sae",
    "push_sae_to_hub",
    "resolve_repo",
    "save_sae",
]


class SaeLoadError(SAeUronError, OSError, ValueError):
    """An SAE folder or Hub repo that cannot be found or read (catchable as OSError or ValueError)."""


# ------------------------------------------------------------------------------------------ save
def atomic_write(target: Path, write: Callable[[str], None]) -> None:
    """Run ``write(tmp_path)`` on a temp file next to ``target``, then rename it over ``target``."""
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def sae_state_tensors(sae: SparseAutoencoder) -> dict[str, torch.Tensor]:
    """The four tensors of the on-disk layout, detached, contiguous and on the CPU."""
    tensors = {
        "encoder.weight": sae.encoder.weight,
        "encoder.bias": sae.encoder.bias,
        "W_dec": sae.W_dec,
        "b_dec": sae.b_dec,
    }
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        t = t.detach().to("cpu").contiguous()
        # safetensors refuses tensors that share memory (e.g. a tied encoder/decoder).
        if any(t.data_ptr() == o.data_ptr() for o in out.values()):
            t = t.clone()
        out[name] = t
    return out


def save_sae(
    sae: SparseAutoencoder, path: str | os.PathLike[str], *, safe_serialization: bool = True
) -> Path:
    """Write ``cfg.json`` and ``sae.safetensors`` into the folder ``path`` (created if needed).

    Each file is written to a temp file in the same folder and renamed into place, so readers
    never see a half-written file. ``safe_serialization=False`` is refused: this package never
    writes pickles. Returns the folder.
    """
    if not safe_serialization:
        raise ValueError("saeuron_plugin only writes safetensors; safe_serialization=False is not supported")
    folder = Path(path).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    try:
        cfg_text = json.dumps(sae.cfg.to_dict(), indent=2) + "\n"
    except TypeError as e:
        raise ValueError(f"SAE config is not JSON-serialisable (check cfg.extra): {e}") from e
    tensors = sae_state_tensors(sae)
    for name, t in tensors.items():  # our own loader refuses NaN/inf weights: never write them
        if not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise NonFiniteError(
                f"refusing to save an SAE whose tensor {name!r} holds {bad} NaN/inf "
                "value(s) (did training diverge?)"
            )

    def write_cfg(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(cfg_text)

    atomic_write(folder / WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    atomic_write(folder / CFG_NAME, write_cfg)
    return folder


# --------------------------------------------------------------------------------------- resolve
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")


def _looks_like_local_path(name: str) -> bool:
    """A string that cannot be a Hub repo id ('org/name') and so must be meant as a path."""
    return (
        name.startswith((".", "/", "~"))
        or "\\" in name
        or name.count("/") > 1
        or os.path.isabs(name)
        or not _REPO_ID.match(name)
    )


def hub_offline() -> bool:
    """Whether Hub access is off (``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE``), read now, not at import."""
    env = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return bool(constants.HF_HUB_OFFLINE) or env.strip().upper() in {"1", "ON", "YES", "TRUE"}


def _natural_key(name: str) -> list[Any]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _patterns(patterns: Sequence[str] | str | None) -> list[str] | str | None:
    return patterns if patterns is None or isinstance(patterns, str) else list(patterns)


def list_hookpoint_folders(root: str | os.PathLike[str]) -> list[str]:
    """Names of the direct subfolders of ``root`` that hold a ``cfg.json``, naturally sorted.

    ``attentions.2`` sorts before ``attentions.10``. A missing ``root`` gives an empty list.
    """
    root = Path(root)
    if not root.is_dir():
        return []
    names = [p.name for p in root.iterdir() if p.is_dir() and (p / CFG_NAME).is_file()]
    return sorted(names, key=_natural_key)


def resolve_repo(
    path_or_repo_id: str | os.PathLike[str],
    *,
    allow_patterns: Sequence[str] | str | None = None,
    ignore_patterns: Sequence[str] | str | None = None,
    revision: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    token: str | bool | None = None,
    local_files_only: bool | None = None,
) -> Path:
    """Local folder for ``path_or_repo_id``: the folder itself, or a Hub snapshot.

    An existing local directory is returned as is. Anything else is taken as a Hub repo id and
    fetched with :func:`huggingface_hub.snapshot_download` (only files matching
    ``allow_patterns``/``ignore_patterns``), which reuses the Hugging Face cache and honours
    ``HF_HUB_OFFLINE``; ``local_files_only=None`` means "offline if HF_HUB_OFFLINE is set".
    Raises :class:`SaeLoadError` for an unknown path or repo.
    """
    if isinstance(path_or_repo_id, os.PathLike):
        local = Path(path_or_repo_id).expanduser()
        if not local.exists():
            raise SaeLoadError(f"no SAE folder at {local}: the path does not exist")
    else:
        local = Path(str(path_or_repo_id)).expanduser()
    if local.exists():
        if not local.is_dir():
            raise SaeLoadError(f"{local} is a file; expected a folder holding {CFG_NAME} and {WEIGHTS_NAME}")
        return local
    name = str(path_or_repo_id)
    if _looks_like_local_path(name):
        raise SaeLoadError(
            f"no SAE folder at {local}: the path does not exist "
            "(and it is not a Hugging Face Hub repo id of the form 'org/name')"
        )

    offline = hub_offline()
    if local_files_only is None:
        local_files_only = offline
    where = f"'{name}'" + (f" (revision '{revision}')" if revision else "")
    cache = str(cache_dir) if cache_dir is not None else constants.HF_HUB_CACHE
    try:
        snapshot = snapshot_download(
            name,
            revision=revision,
            cache_dir=cache_dir,
            token=token,
            local_files_only=local_files_only,
            allow_patterns=_patterns(allow_patterns),
            ignore_patterns=_patterns(ignore_patterns),
        )
    except (LocalEntryNotFoundError, OfflineModeIsEnabled) as e:
        if offline:
            reason = "HF_HUB_OFFLINE is set"
        elif local_files_only:
            reason = "local_files_only=True"
        else:
            reason = "the Hub could not be reached"
        raise SaeLoadError(
            f"could not find SAE {where} locally or in the Hugging Face cache at {cache} ({reason}); "
            f"there is no local folder of that name either. Download it once with network access, "
            f"or pass the path of a local folder. [{type(e).__name__}: {e}]"
        ) from e
    except RevisionNotFoundError as e:
        raise SaeLoadError(f"revision '{revision}' does not exist in Hub repo '{name}'") from e
    except RepositoryNotFoundError as e:
        raise SaeLoadError(
            f"could not find SAE {where}: no local folder of that name, and no such repository on the "
            f"Hugging Face Hub (or it is private or gated: pass token=...)"
        ) from e
    except HfHubHTTPError as e:
        raise SaeLoadError(f"could not download SAE {where} from the Hugging Face Hub: {e}") from e
    except HFValidationError as e:
        raise SaeLoadError(
            f"'{name}' is neither an existing local folder nor a valid Hub repo id: {e}"
        ) from e
    return Path(snapshot)


# ------------------------------------------------------------------------------------------ load
def _read_cfg(folder: Path) -> SaeConfig:
    cfg_path = folder / CFG_NAME
    try:
        raw = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SaeLoadError(f"{CFG_NAME} at {cfg_path} is not valid JSON: {e}") from e
    except OSError as e:
        raise SaeLoadError(f"cannot read {CFG_NAME} at {cfg_path}: {e}") from e
    if not isinstance(raw, dict):
        raise SaeLoadError(f"{CFG_NAME} at {cfg_path} must hold a JSON object, got {type(raw).__name__}")
    try:
        return SaeConfig.from_dict(raw)
    except (SaeConfigError, TypeError, ValueError) as e:
        raise SaeLoadError(f"invalid SAE config in {cfg_path}: {e}") from e


def _read_tensors(folder: Path, cfg: SaeConfig) -> dict[str, torch.Tensor]:
    path = folder / WEIGHTS_NAME
    if not path.is_file():
        raise SaeLoadError(f"no {WEIGHTS_NAME} in {folder} (found {CFG_NAME} but no weights)")
    try:
        tensors = load_file(str(path), device="cpu")
    except SafetensorError as e:
        raise SaeLoadError(f"{WEIGHTS_NAME} at {path} is corrupt or truncated: {e}") from e
    except OSError as e:
        raise SaeLoadError(f"cannot read {WEIGHTS_NAME} at {path}: {e}") from e

    missing = [n for n in TENSOR_NAMES if n not in tensors]
    unexpected = sorted(set(tensors) - set(TENSOR_NAMES))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing tensors {missing}")
        if unexpected:
            parts.append(f"unexpected tensors {unexpected}")
        raise SaeLoadError(
            f"{WEIGHTS_NAME} at {path} has {' and '.join(parts)}; expected exactly {list(TENSOR_NAMES)}"
        )
    n, d = cfg.num_latents, cfg.d_in
    expected = {"encoder.weight": (n, d), "encoder.bias": (n,), "W_dec": (n, d), "b_dec": (d,)}
    for name, shape in expected.items():
        t = tensors[name]
        if tuple(t.shape) != shape:
            raise SaeLoadError(
                f"tensor '{name}' in {path} has shape {list(t.shape)} but {CFG_NAME} "
                f"(d_in={d}, num_latents={n}) implies {list(shape)}"
            )
        if not t.is_floating_point():
            raise SaeLoadError(f"tensor '{name}' in {path} has dtype {t.dtype}; expected a float type")
        if not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise SaeLoadError(f"tensor '{name}' in {path} holds {bad} NaN/inf value(s)")
    return tensors


def _missing_subfolder_error(root: Path, subfolder: str, available: list[str], source: str) -> SaeLoadError:
    hint = (
        f"available hookpoint folders: {available}"
        if available
        else "it holds no hookpoint folders with a cfg.json"
    )
    return SaeLoadError(f"no SAE subfolder '{subfolder}' in {source} ({root}); {hint}")


def load_sae_folder(
    folder: str | os.PathLike[str],
    *,
    sae_class: type[SparseAutoencoder],
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    hookpoint: str | None = None,
) -> SparseAutoencoder:
    """Load one local SAE folder (``cfg.json`` + ``sae.safetensors``) as ``sae_class``, validating everything.

    ``hookpoint`` fills ``cfg.hookpoint`` when the file does not name one (sparsify and SAeUron
    folders are named after their hookpoint but do not record it). Users call
    ``SparseAutoencoder.from_pretrained``, which passes its own class.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise SaeLoadError(f"no SAE folder at {folder}: the path does not exist or is not a folder")
    if not (folder / CFG_NAME).is_file():
        available = list_hookpoint_folders(folder)
        if available:
            raise SaeLoadError(
                f"{folder} holds several SAEs (one folder per hookpoint) but no top-level {CFG_NAME}; "
                f"pass subfolder=... with one of {available}"
            )
        raise SaeLoadError(f"no {CFG_NAME} in {folder}: not an SAE folder")
    cfg = _read_cfg(folder)
    if cfg.hookpoint is None and hookpoint:
        cfg.hookpoint = hookpoint
    tensors = _read_tensors(folder, cfg)
    target_dtype = dtype or tensors["W_dec"].dtype
    tensors = {k: v.to(target_dtype) for k, v in tensors.items()}
    # Build on the meta device: no random init of a 50M-parameter module just to overwrite it.
    with torch.device("meta"):
        sae = sae_class(cfg, dtype=target_dtype)
    sae.load_state_dict(tensors, strict=True, assign=True)
    if device is not None:
        sae = sae.to(device)
    return sae


def load_sae(
    path_or_repo_id: str | os.PathLike[str],
    subfolder: str | None = None,
    *,
    sae_class: type[SparseAutoencoder],
    revision: str | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    token: str | bool | None = None,
    local_files_only: bool | None = None,
) -> SparseAutoencoder:
    """Load an SAE from a local folder or a Hugging Face Hub repo (``subfolder`` = hookpoint folder).

    A local folder is used directly. Otherwise the repo is fetched with ``snapshot_download``
    (only ``<subfolder>/*``; without a subfolder only the top-level SAE files and the hookpoint
    ``cfg.json`` files, enough to list the choices), honouring the cache and ``HF_HUB_OFFLINE``.
    Weights keep their stored dtype unless ``dtype`` is given. Raises :class:`SaeLoadError`.
    """
    sub = subfolder.strip("/") if subfolder else None
    if sub:
        patterns: list[str] = [f"{sub}/*"]
    else:
        patterns = [CFG_NAME, WEIGHTS_NAME, f"*/{CFG_NAME}"]
    kwargs: dict[str, Any] = dict(
        revision=revision, cache_dir=cache_dir, token=token, local_files_only=local_files_only
    )
    root = resolve_repo(path_or_repo_id, allow_patterns=patterns, **kwargs)
    is_local = Path(str(path_or_repo_id)).expanduser().exists()
    source = f"local folder {path_or_repo_id}" if is_local else f"Hub repo '{path_or_repo_id}'"
    if not sub:
        return load_sae_folder(root, sae_class=sae_class, device=device, dtype=dtype)
    folder = root / sub
    if not (folder / CFG_NAME).is_file() and not (folder / WEIGHTS_NAME).is_file():
        available = list_hookpoint_folders(root)
        if not available and not is_local:
            # The snapshot holds only what matched; fetch just the cfg.json files to list choices.
            try:
                available = list_hookpoint_folders(
                    resolve_repo(path_or_repo_id, allow_patterns=[f"*/{CFG_NAME}"], **kwargs)
                )
            except SaeLoadError:
                available = []
        raise _missing_subfolder_error(root, sub, available, source)
    return load_sae_folder(folder, sae_class=sae_class, device=device, dtype=dtype, hookpoint=Path(sub).name)


# ------------------------------------------------------------------------------------------ push
def push_sae_to_hub(
    sae: SparseAutoencoder,
    repo_id: str,
    subfolder: str | None = None,
    *,
    commit_message: str | None = None,
    private: bool | None = None,
    token: str | bool | None = None,
    revision: str | None = None,
) -> str:
    """Upload the SAE folder to ``repo_id`` (into ``subfolder``, e.g. the hookpoint); returns the commit URL.

    The repo is created if needed (``private`` applies only then) and so is the ``revision``
    branch. For the bundle layout pass ``subfolder=sae.cfg.hookpoint``.
    """
    sub = subfolder.strip("/") if subfolder else None
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True, token=token)
    if revision is not None:
        api.create_branch(repo_id, branch=revision, exist_ok=True, token=token)
    where = f" {sub}" if sub else ""
    message = commit_message or (
        f"Upload SAE{where} (d_in={sae.d_in}, num_latents={sae.num_latents}, k={sae.cfg.k})"
    )
    with tempfile.TemporaryDirectory(prefix="sae-push-") as tmp:
        save_sae(sae, tmp)
        info = api.upload_folder(
            repo_id=repo_id,
            folder_path=tmp,
            path_in_repo=sub,
            commit_message=message,
            revision=revision,
            token=token,
        )
    url = getattr(info, "commit_url", None)
    return str(url if url is not None else info)
