"""On-disk activation store: safetensors shards plus a JSON manifest, streamed in shuffled batches.

Layout of a store folder::

    manifest.json                  d_in, dtype, shard list (file, rows), keys, user metadata
    shard-000000.safetensors       ``x`` [rows, d_in] in the store dtype, optional ``tau`` [rows] float32
    shard-000001.safetensors ...

Why safetensors shards rather than raw binaries read with ``numpy.memmap``: each shard is
self-describing (dtype and shape sit in its header, so it can be checked against the manifest and
opened by any safetensors tool), bfloat16 is stored natively (numpy has none), ``safe_open``
memory-maps the file and reads only the tensor asked for (``tau`` is never touched unless
requested), and the project uses safetensors everywhere already; no pickles. Global random row
access, the one thing a flat memmap adds, is seek-bound on disk anyway; the reader instead shuffles
the shard order, then rows across a buffer of ``buffer_shards`` shards, so it reads whole files
sequentially and holds at most that buffer plus one batch in RAM, whatever the dataset size.

Writes are crash-safe: a shard is written to a temporary name, fsynced and renamed, and only then
is the manifest replaced (temp file, fsync, ``os.replace``). The manifest therefore never names a
half-written shard; a crash between the two steps leaves an orphan file that readers ignore and
the next writer deletes. One writer per store at a time.
"""

from __future__ import annotations

import contextlib
import json
import math
import numbers
import os
import re
import shutil
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from ..errors import BadFileError, MissingFileError, SAeUronError
from .files import read_json_object, safetensors_shapes, typed_field

MANIFEST = "manifest.json"
PARTS = "parts"
"""Sub-folder of a store holding the per-process part stores of a multi-process collection."""
FORMAT = "saeuron-activation-store"
_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
_HEADER_DTYPES = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32"}
_SHARD_FILE = re.compile(r"^shard-(\d+)\.safetensors(\.tmp)?$")


class ActivationStoreError(SAeUronError, ValueError):
    """A folder that is not a readable activation store (missing, corrupt or inconsistent)."""


class StoreFileError(BadFileError, ActivationStoreError):
    """A manifest or shard of an activation store that cannot be used; names the file and the field."""


class ShardInfo(NamedTuple):
    """One durable shard as the manifest records it."""

    file: str
    rows: int


def _fsync(path: Path) -> None:
    """Flush a file (or, on POSIX, a directory entry) to disk."""
    if path.is_dir():
        if os.name == "nt":  # directories cannot be opened for fsync on Windows
            return
        fd = os.open(path, os.O_RDONLY)
    else:
        fd = os.open(path, os.O_RDWR)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _generator(seed: int, stream: int) -> torch.Generator:
    """An independent generator per (seed, stream): any group can be replayed without the others."""
    return torch.Generator().manual_seed((seed * 1_000_003 + stream) % 2**63)


class ActivationStore:
    """Append-only, sharded activation store with optional per-row normalised time τ.

    ``ActivationStore.create(path, d_in=...)`` makes a new store, ``ActivationStore(path)`` reopens
    one (to read, or to append more rows). Rows buffer in RAM and go to disk ``shard_rows`` at a
    time; ``flush()``, ``close()`` or leaving a ``with`` block writes the partial shard.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        manifest = self.path / MANIFEST
        if not manifest.is_file():
            what = "folder does not exist" if not self.path.exists() else f"{MANIFEST} not found"
            raise MissingFileError(
                f"no activation store at {self.path}: {what} (make one with ActivationStore.create)"
            )
        try:
            raw = read_json_object(manifest, "activation store manifest")
        except BadFileError as err:
            raise StoreFileError(manifest, err.problem) from err
        if raw.get("format") != FORMAT:
            raise StoreFileError(
                manifest, f"not an activation store manifest (expected format {FORMAT!r})", field="format"
            )
        self.d_in: int = _manifest_field(raw, "d_in", int, manifest, positive=True)
        dtype = _manifest_field(raw, "dtype", str, manifest)
        if dtype not in _DTYPES:
            raise StoreFileError(manifest, f"must be one of {sorted(_DTYPES)}, got {dtype!r}", field="dtype")
        self.dtype: torch.dtype = _DTYPES[dtype]
        self.shard_rows: int = _manifest_field(raw, "shard_rows", int, manifest, positive=True)
        self.has_tau: bool | None = _manifest_field(raw, "has_tau", bool, manifest, default=None)
        self._shards = _read_shard_list(raw, manifest)
        self._keys: list[str] = _manifest_field(raw, "keys", list, manifest)
        if not all(isinstance(k, str) for k in self._keys):
            raise StoreFileError(manifest, "must be a list of strings", field="keys")
        self._metadata: dict[str, Any] = dict(_manifest_field(raw, "metadata", dict, manifest))
        indices = [int(_SHARD_FILE.match(s.file)[1]) for s in self._shards]  # type: ignore[index]
        missing = [s.file for s in self._shards if not (self.path / s.file).is_file()]
        if missing:
            raise ActivationStoreError(f"activation store at {self.path} is missing shards {missing[:5]}")
        for shard in self._shards:  # headers only: a truncated or foreign shard fails now, not mid-training
            self._check_shard_header(shard)
        self._key_set = set(self._keys)
        self._next_index = 1 + max(indices, default=-1)
        self._pending: list[Tensor] = []
        self._pending_tau: list[Tensor] = []
        self._pending_rows = 0
        self._pending_keys: dict[str, int] = {}  # key -> total row count once its rows are durable
        self._cleaned = False
        self._closed = False

    @classmethod
    def create(
        cls,
        path: str | os.PathLike[str],
        d_in: int,
        dtype: torch.dtype = torch.float16,
        shard_rows: int = 65_536,
        metadata: dict[str, Any] | None = None,
        exist_ok: bool = False,
    ) -> ActivationStore:
        """Make an empty store at ``path``; with ``exist_ok`` reopen a matching existing one."""
        path = Path(path)
        name = next((k for k, v in _DTYPES.items() if v == dtype), None)
        if name is None:
            raise ValueError(f"store dtype must be float16, bfloat16 or float32, got {dtype}")
        if not (_positive_int(d_in) and _positive_int(shard_rows)):
            raise ValueError(
                f"d_in and shard_rows must be positive integers, got {d_in!r} and {shard_rows!r}"
            )
        if (path / MANIFEST).exists():
            if not exist_ok:
                raise FileExistsError(
                    f"an activation store already exists at {path} (pass exist_ok=True "
                    "to append to it, or reopen it with ActivationStore(path))"
                )
            store = cls(path)
            if (store.d_in, store.dtype) != (d_in, dtype):
                raise ActivationStoreError(
                    f"the store at {path} holds d_in={store.d_in} {store.dtype}, not d_in={d_in} {dtype}"
                )
            return store
        try:
            json.dumps(metadata or {})
        except TypeError as err:
            raise TypeError(f"store metadata must be JSON-serialisable: {err}") from err
        path.mkdir(parents=True, exist_ok=True)
        _write_json(
            path / MANIFEST,
            {
                "format": FORMAT,
                "version": 1,
                "d_in": int(d_in),
                "dtype": name,
                "shard_rows": int(shard_rows),
                "has_tau": None,
                "shards": [],
                "keys": [],
                "metadata": metadata or {},
            },
        )
        return cls(path)

    # ------------------------------------------------------------ properties
    def __len__(self) -> int:
        """Rows in the store, including rows still buffered in RAM."""
        return sum(s.rows for s in self._shards) + self._pending_rows

    @property
    def num_shards(self) -> int:
        return len(self._shards)

    @property
    def metadata(self) -> dict[str, Any]:
        return dict(self._metadata)

    @property
    def keys(self) -> frozenset[str]:
        """Keys whose rows are durably on disk (what a resuming collector can skip)."""
        return frozenset(self._key_set)

    def has_key(self, key: str) -> bool:
        """Whether rows were appended under ``key``: durably, or buffered by this object."""
        return key in self._key_set or key in self._pending_keys

    def __repr__(self) -> str:
        return (
            f"ActivationStore({str(self.path)!r}, rows={len(self)}, d_in={self.d_in}, "
            f"dtype={self.dtype}, shards={self.num_shards})"
        )

    # --------------------------------------------------------------- writing
    def append(self, batch: Tensor, tau: Tensor | float | None = None, key: str | None = None) -> None:
        """Add rows [N, d_in] (leading dims are flattened) with optional per-row τ in [0, 1].

        ``key`` (e.g. a prompt id) is recorded in the manifest once all rows appended so far are
        durable; pass it with the last append of a unit of work so a crash never marks it done.
        """
        if self._closed:
            raise ValueError(f"activation store at {self.path} is closed")
        if not torch.is_tensor(batch) or not batch.is_floating_point():
            raise ValueError(
                f"activations must be a floating-point tensor, got {type(batch).__name__}"
                + (f" of {batch.dtype}" if torch.is_tensor(batch) else "")
            )
        if batch.dim() == 0 or batch.shape[-1] != self.d_in:
            width = batch.shape[-1] if batch.dim() else "a scalar"
            raise ValueError(f"activation width {width} does not match the store's d_in={self.d_in}")
        x = batch.detach().reshape(-1, self.d_in).to("cpu", self.dtype, copy=True)  # caller may reuse
        if not torch.isfinite(x).all():
            note = "" if not torch.isfinite(batch).all() else f" after casting to {self.dtype} (overflow)"
            raise ValueError(f"activations contain NaN/inf{note}")
        n = x.shape[0]
        t = None
        if tau is not None:
            t = torch.as_tensor(tau, dtype=torch.float32).detach().cpu().reshape(-1)
            if t.numel() == 1 and n != 1:
                t = t.expand(n)
            if t.numel() != n:
                raise ValueError(f"tau has {t.numel()} values but the batch has {n} rows")
            if not (torch.isfinite(t).all() and (t >= 0).all() and (t <= 1).all()):
                raise ValueError("tau must be finite normalised times in [0, 1]")
        if self.has_tau is not None and self.has_tau != (t is not None):
            raise ValueError(
                f"the store {'has' if self.has_tau else 'has no'} τ column: pass tau with "
                f"{'every' if self.has_tau else 'no'} append"
            )
        if n:
            self.has_tau = t is not None
            self._pending.append(x)
            if t is not None:
                self._pending_tau.append(t.clone())
            self._pending_rows += n
        if key is not None:
            self._pending_keys[str(key)] = len(self)
        while self._pending_rows >= self.shard_rows:
            cut = self._next_cut()
            if cut == 0:  # a keyed unit longer than a shard is still open: wait for its key
                break
            self._flush_rows(cut)

    def _next_cut(self) -> int:
        """Rows of the next full shard. A keyed store cuts only where a key's rows end, so a shard
        never holds part of a unit whose key is not recorded (a crash would otherwise leave those
        rows behind, and the resumed run would append the unit again: duplicated rows)."""
        if not (self._keys or self._pending_keys):
            return self.shard_rows
        durable = len(self) - self._pending_rows
        ends = sorted(
            end - durable for end in self._pending_keys.values() if 0 < end - durable <= self._pending_rows
        )
        within = [e for e in ends if e <= self.shard_rows]
        if within:
            return within[-1]
        return ends[0] if ends else 0

    def flush(self) -> None:
        """Write buffered rows (a partial shard) and record their keys."""
        if self._pending_rows or self._pending_keys:
            self._flush_rows(self._pending_rows)

    def close(self) -> None:
        self.flush()
        self._closed = True

    def __enter__(self) -> ActivationStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _flush_rows(self, rows: int) -> None:
        """Make the first ``rows`` buffered rows durable: shard first, manifest second."""
        if not self._cleaned:
            self._remove_orphans()
        shards = list(self._shards)
        x = _cat(self._pending) if self._pending else torch.empty(0, self.d_in, dtype=self.dtype)
        t = _cat(self._pending_tau) if self._pending_tau else None
        if rows:
            name = f"shard-{self._next_index:06d}.safetensors"
            tmp = self.path / f"{name}.tmp"
            tensors = {"x": x[:rows].contiguous()} | ({"tau": t[:rows].contiguous()} if t is not None else {})
            save_file(tensors, str(tmp), metadata={"format": FORMAT})
            _fsync(tmp)
            os.replace(tmp, self.path / name)
            _fsync(self.path)
            shards.append(ShardInfo(name, rows))
        durable = sum(s.rows for s in shards)
        done = [k for k, end in self._pending_keys.items() if end <= durable and k not in self._key_set]
        self._write_manifest(shards, self._keys + done)
        # Only now, with both files durable, does the in-memory state move on.
        self._shards, self._keys = shards, self._keys + done
        self._key_set.update(done)
        self._pending_keys = {k: e for k, e in self._pending_keys.items() if e > durable}
        if rows:
            self._next_index += 1
            self._pending = [x[rows:]] if x.shape[0] > rows else []
            self._pending_tau = [t[rows:]] if t is not None and x.shape[0] > rows else []
            self._pending_rows -= rows

    # ------------------------------------------------------- multi-process parts
    def part(self, rank: int, metadata: dict[str, Any] | None = None) -> ActivationStore:
        """The store process ``rank`` of a multi-process collection writes to (created or reopened):
        ``<store>/parts/rank-NNNNN``, merged back by :meth:`absorb_parts`."""
        return ActivationStore.create(
            self.path / PARTS / f"rank-{rank:05d}",
            d_in=self.d_in,
            dtype=self.dtype,
            shard_rows=self.shard_rows,
            metadata=self._metadata if metadata is None else metadata,
            exist_ok=True,
        )

    def absorb_parts(self) -> int:
        """Absorb every part store under ``<store>/parts`` (rank order), then drop the empty folder;
        returns the rows added. Safe to call again after a crash at any point."""
        root = self.path / PARTS
        if not root.is_dir():
            return 0
        added = 0
        for part in sorted(root.iterdir()):
            if not part.is_dir():
                continue
            if part.name.endswith(_ABSORBED) or not (part / MANIFEST).is_file():
                shutil.rmtree(part)  # merged already, or created without ever holding a durable row
            else:
                added += self.absorb(part)
        with contextlib.suppress(OSError):
            root.rmdir()
        return added

    def absorb(self, part_path: str | os.PathLike[str]) -> int:
        """Move another store's durable rows and keys into this one, atomically; returns the rows added.

        The part's shards are hard-linked (copied where links are impossible) under this store's
        next shard names, then one manifest write adds them with their keys, then the part is
        deleted. A crash before the manifest write leaves this store as it was (the new names are
        orphans the next writer deletes); a crash after it leaves a part whose keys are all here
        already, which the next call just deletes. Keys found in both stores otherwise are refused
        (their rows would be counted twice).
        """
        self.flush()
        part = ActivationStore(part_path)
        if (part.d_in, part.dtype) != (self.d_in, self.dtype):
            raise ActivationStoreError(
                f"cannot merge {part.path} (d_in={part.d_in} {part.dtype}) into {self.path} "
                f"(d_in={self.d_in} {self.dtype})"
            )
        if None not in (part.has_tau, self.has_tau) and part.has_tau != self.has_tau:
            raise ActivationStoreError(
                f"cannot merge {part.path} into {self.path}: one has a τ column, one not"
            )
        new_keys = [k for k in part._keys if k not in self._key_set]
        if part._keys and not new_keys:  # merged before a crash: only the deletion was left
            _remove_store(part.path)
            return 0
        if len(new_keys) != len(part._keys):
            shared = sorted(set(part._keys) & self._key_set)
            raise ActivationStoreError(
                f"{part.path} and {self.path} both hold keys {shared[:3]}: merging would duplicate their rows"
            )
        if not self._cleaned:
            self._remove_orphans()
        shards, index = list(self._shards), self._next_index
        for shard in part._shards:
            name = f"shard-{index:06d}.safetensors"
            _link_or_copy(part.path / shard.file, self.path / name)
            shards.append(ShardInfo(name, shard.rows))
            index += 1
        _fsync(self.path)
        has_tau = self.has_tau
        if part.has_tau is not None:
            self.has_tau = part.has_tau
        try:
            self._write_manifest(shards, self._keys + new_keys)
        except BaseException:
            self.has_tau = has_tau
            raise
        self._shards, self._keys, self._next_index = shards, self._keys + new_keys, index
        self._key_set.update(new_keys)
        _remove_store(part.path)
        return sum(s.rows for s in part._shards)

    def _write_manifest(self, shards: list[ShardInfo], keys: list[str]) -> None:
        _write_json(
            self.path / MANIFEST,
            {
                "format": FORMAT,
                "version": 1,
                "d_in": self.d_in,
                "dtype": str(self.dtype).removeprefix("torch."),
                "shard_rows": self.shard_rows,
                "has_tau": self.has_tau,
                "shards": [s._asdict() for s in shards],
                "keys": keys,
                "metadata": self._metadata,
            },
        )

    def _remove_orphans(self) -> None:
        """Delete shard files the manifest does not name (left by a crash mid-write)."""
        known = {s.file for s in self._shards}
        for entry in self.path.iterdir():
            if (_SHARD_FILE.match(entry.name) and entry.name not in known) or entry.name == f"{MANIFEST}.tmp":
                entry.unlink(missing_ok=True)
        self._cleaned = True

    # --------------------------------------------------------------- reading
    def _check_shard_header(self, shard: ShardInfo) -> None:
        """The shard's header says what the manifest says: x [rows, d_in] in the store dtype (+ τ)."""
        path = self.path / shard.file
        try:
            shapes = safetensors_shapes(path, "activation shard")
        except BadFileError as err:
            raise StoreFileError(path, err.problem) from err
        want = {"x": ((shard.rows, self.d_in), _HEADER_DTYPES[self.dtype])}
        if self.has_tau:
            want["tau"] = ((shard.rows,), "F32")
        for name, (shape, dtype) in want.items():
            if name not in shapes:
                raise StoreFileError(path, "missing from the shard", field=name)
            if shapes[name] != (shape, dtype):
                raise StoreFileError(
                    path,
                    f"holds {list(shapes[name][0])} {shapes[name][1]}, the manifest "
                    f"says {list(shape)} {dtype}",
                    field=name,
                )

    def _load(self, shard: ShardInfo, with_tau: bool) -> tuple[Tensor, Tensor | None]:
        path = self.path / shard.file
        try:
            with safe_open(str(path), framework="pt") as f:
                x = f.get_tensor("x")
                tau = f.get_tensor("tau") if with_tau else None
        except Exception as err:  # changed on disk since the store was opened
            raise StoreFileError(path, f"unreadable activation shard ({type(err).__name__}: {err})") from err
        for name, t in (("x", x), ("tau", tau)):
            if t is not None and not bool(torch.isfinite(t).all()):
                raise StoreFileError(
                    path, "holds NaN/inf values (appends refuse them: the file was changed)", field=name
                )
        if tuple(x.shape) != (shard.rows, self.d_in) or x.dtype != self.dtype:
            raise ActivationStoreError(
                f"shard {self.path / shard.file} holds {tuple(x.shape)} {x.dtype}, "
                f"the manifest says ({shard.rows}, {self.d_in}) {self.dtype}"
            )
        return x, tau

    def _check_read(self, with_tau: bool) -> None:
        self.flush()  # read your own writes
        if with_tau and not self.has_tau:
            raise ValueError(f"activation store at {self.path} has no τ column (with_tau=True)")

    def iter_batches(
        self,
        batch_size: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        buffer_shards: int = 4,
        with_tau: bool = False,
        dtype: torch.dtype = torch.float32,
        drop_last: bool = False,
        start_batch: int = 0,
        epochs: int = 1,
    ) -> Iterator[Tensor | tuple[Tensor, Tensor]]:
        """Stream [batch_size, d_in] batches (``(x, tau)`` with ``with_tau``), ``epochs`` passes.

        Shuffled reads permute the shard order, then rows across groups of ``buffer_shards``
        shards; epoch ``e`` uses ``seed + e``. The sequence depends only on the seed and the shard
        list, so a run can resume exactly: ``start_batch=n`` yields what the full stream yields
        after its first n batches, loading nothing for the skipped groups.
        """
        self._check_read(with_tau)
        if batch_size <= 0 or buffer_shards <= 0 or start_batch < 0:
            raise ValueError("batch_size and buffer_shards must be positive and start_batch >= 0")
        shards = list(self._shards)  # a snapshot: rows appended meanwhile wait for the next call
        total = sum(s.rows for s in shards)
        if total == 0:
            raise ValueError(f"activation store at {self.path} is empty")
        per_epoch = total // batch_size if drop_last else math.ceil(total / batch_size)

        def stream() -> Iterator[Any]:  # a nested generator so that the checks above run eagerly
            for epoch in range(epochs):
                skip = start_batch - epoch * per_epoch
                if skip < per_epoch:
                    yield from self._epoch(
                        shards,
                        batch_size,
                        shuffle,
                        seed + epoch,
                        buffer_shards,
                        with_tau,
                        dtype,
                        drop_last,
                        max(skip, 0) * batch_size,
                    )

        return stream()

    def _epoch(
        self,
        shards: list[ShardInfo],
        batch_size: int,
        shuffle: bool,
        seed: int,
        buffer: int,
        with_tau: bool,
        dtype: torch.dtype,
        drop_last: bool,
        start: int,
    ) -> Iterator[Any]:
        if shuffle:
            order = torch.randperm(len(shards), generator=_generator(seed, 0)).tolist()
            groups = [order[i : i + buffer] for i in range(0, len(order), buffer)]
        else:
            groups = [[i] for i in range(len(shards))]
        pos, carry_x, carry_t = 0, None, None  # pos: stream position where the current group starts
        for gi, group in enumerate(groups):
            rows = sum(shards[i].rows for i in group)
            if pos + rows <= start:
                pos += rows
                continue
            parts = [self._load(shards[i], with_tau) for i in group]
            x = torch.cat([p[0] for p in parts])
            t = torch.cat([p[1] for p in parts]) if with_tau else None
            if shuffle:
                perm = torch.randperm(rows, generator=_generator(seed, gi + 1))
                x, t = x[perm], (t[perm] if t is not None else None)
            if pos < start:
                x, t = x[start - pos :], (t[start - pos :] if t is not None else None)
            pos += rows
            if carry_x is not None:
                x = torch.cat([carry_x, x])
                t = torch.cat([carry_t, t]) if t is not None else None
            full = x.shape[0] // batch_size * batch_size
            for b in range(0, full, batch_size):
                xb = x[b : b + batch_size].to(dtype)
                yield (xb, t[b : b + batch_size]) if t is not None else xb
            carry_x, carry_t = x[full:], (t[full:] if t is not None else None)
        if carry_x is not None and carry_x.shape[0] and not drop_last:
            yield (carry_x.to(dtype), carry_t) if carry_t is not None else carry_x.to(dtype)

    def read_all(
        self, limit: int | None = None, *, with_tau: bool = False, dtype: torch.dtype | None = None
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Every row (or the first ``limit``) in storage order, in the store dtype by default."""
        self._check_read(with_tau)
        xs, ts, have = [], [], 0
        for shard in self._shards:
            if limit is not None and have >= limit:
                break
            x, t = self._load(shard, with_tau)
            xs.append(x)
            ts.append(t)
            have += x.shape[0]
        x = torch.cat(xs) if xs else torch.empty(0, self.d_in, dtype=self.dtype)
        x = x[:limit].to(dtype or self.dtype)
        if not with_tau:
            return x
        return x, (torch.cat(ts) if ts else torch.empty(0))[:limit]


def _positive_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value > 0


def _manifest_field(raw: dict[str, Any], name: str, kind: type, manifest: Path, **kw: Any) -> Any:
    try:
        return typed_field(raw, name, kind, manifest, **kw)
    except BadFileError as err:
        raise StoreFileError(manifest, err.problem, field=name) from err


def _read_shard_list(raw: dict[str, Any], manifest: Path) -> list[ShardInfo]:
    entries = _manifest_field(raw, "shards", list, manifest)
    shards = []
    for i, entry in enumerate(entries):
        where = f"shards[{i}]"
        if not isinstance(entry, dict):
            raise StoreFileError(manifest, f"must be an object, got {type(entry).__name__}", field=where)
        file = entry.get("file")
        rows = entry.get("rows")
        if not isinstance(file, str) or not _SHARD_FILE.match(file) or file.endswith(".tmp"):
            raise StoreFileError(manifest, f"not a shard file name: {file!r}", field=f"{where}.file")
        if isinstance(rows, bool) or not isinstance(rows, int) or rows < 0:
            raise StoreFileError(
                manifest, f"must be a non-negative integer, got {rows!r}", field=f"{where}.rows"
            )
        shards.append(ShardInfo(file, rows))
    return shards


_ABSORBED = ".absorbed"


def _remove_store(path: Path) -> None:
    """Delete a merged part: renamed first (one atomic step), so a crash mid-deletion leaves a
    folder :meth:`ActivationStore.absorb_parts` recognises and deletes, never a half-deleted store."""
    gone = path.with_name(path.name + _ABSORBED)
    os.replace(path, gone)
    shutil.rmtree(gone)


def _link_or_copy(src: Path, dst: Path) -> None:
    """Give ``src`` a second name ``dst`` (a hard link), or a durable copy where links fail."""
    try:
        os.link(src, dst)
    except OSError:
        tmp = dst.with_name(dst.name + ".tmp")
        shutil.copyfile(src, tmp)
        _fsync(tmp)
        os.replace(tmp, dst)


def _cat(parts: list[Tensor]) -> Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    """Atomically replace ``path``: temp file, fsync, rename, fsync the folder."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync(path.parent)


@contextlib.contextmanager
def flushing(stores: Mapping[str, Any]) -> Iterator[None]:
    """Flush every store on the way out, also when collection raised (what was appended is kept)."""
    try:
        yield
    finally:
        for store in stores.values():
            store.flush()


def open_stores(
    store: Any, specs: Mapping[str, tuple[int, dict[str, Any]]], dtype: torch.dtype
) -> dict[str, Any] | Callable[..., None]:
    """Where a collection run writes, per hookpoint: ``specs`` is ``path -> (width, metadata)``.

    ``store`` may be a folder (one store per hookpoint in ``<folder>/<path>``, created or reopened),
    a dict ``path -> store``, one store (one hookpoint only), or a callable sink (returned as is).
    """
    if isinstance(store, str | os.PathLike):
        root = Path(store)
        stores = {
            path: ActivationStore.create(root / path, d_in=width, dtype=dtype, exist_ok=True, metadata=meta)
            for path, (width, meta) in specs.items()
        }
        for target in stores.values():  # what an interrupted multi-process run left in its parts
            target.absorb_parts()
        return stores
    if isinstance(store, Mapping):
        missing = [p for p in specs if p not in store]
        if missing:
            raise KeyError(f"no store given for hookpoints {missing}")
        return {p: store[p] for p in specs}
    if hasattr(store, "append") and hasattr(store, "has_key"):
        if len(specs) != 1:
            raise ValueError(
                "one store was given for several hookpoints; pass a dict hookpoint -> store, or a folder path"
            )
        return {next(iter(specs)): store}
    if callable(store):
        return store
    raise TypeError(
        f"store must be an ActivationStore, a dict of them, a folder path or a callable sink, "
        f"got {type(store).__name__}"
    )


def open_process_stores(
    store: Any, specs: Mapping[str, tuple[int, dict[str, Any]]], dtype: torch.dtype, procs: Any
) -> tuple[dict[str, ActivationStore], dict[str, ActivationStore]]:
    """The merged stores and this process's part stores of a multi-process collection into the
    folder ``store`` (``specs`` as for :func:`open_stores`; ``procs`` a
    :class:`~.processes.Processes`).

    The main process first absorbs parts an interrupted run left behind, so every process then
    sees one store that lists all that is done; each process appends only to its own part.
    """
    if not isinstance(store, str | os.PathLike):
        raise ValueError(
            "a multi-process collection writes to a folder (one store per hookpoint): every process "
            f"appends to its own part, merged at the end; got {type(store).__name__}"
        )
    merged: dict[str, ActivationStore] = {}
    if procs.main:
        merged = open_stores(store, specs, dtype)  # type: ignore[assignment]  (absorbs leftover parts)
    procs.barrier()
    if not procs.main:
        merged = {path: ActivationStore(Path(store) / path) for path in specs}
    return merged, {path: target.part(procs.rank) for path, target in merged.items()}


def merge_process_stores(merged: Mapping[str, ActivationStore], parts: Mapping[str, Any], procs: Any) -> None:
    """End of a multi-process collection: every part durable, then the main process absorbs them."""
    for part in parts.values():
        part.flush()
    procs.barrier()
    if procs.main:
        for target in merged.values():
            target.absorb_parts()
    procs.barrier()
