"""Activation store: round trips, shuffled streaming, exact resume, crash safety, bad input."""

from __future__ import annotations

import json

import pytest
import torch

from saeuron_plugin.sae.store import ActivationStore, ActivationStoreError

D = 6


def rows(n: int, start: int = 0) -> torch.Tensor:
    """Rows whose first column is a unique id, so any order can be checked."""
    x = torch.randn(n, D, generator=torch.Generator().manual_seed(start))
    x[:, 0] = torch.arange(start, start + n, dtype=torch.float32)
    return x


def make_store(path, n: int = 53, shard_rows: int = 8, tau: bool = True) -> ActivationStore:
    with ActivationStore.create(path, d_in=D, dtype=torch.float32, shard_rows=shard_rows) as store:
        for lo in range(0, n, 11):
            x = rows(min(11, n - lo), lo)
            store.append(x, tau=x[:, 0] / n if tau else None)
    return ActivationStore(path)


def collect(store: ActivationStore, **kwargs) -> list[torch.Tensor]:
    return list(store.iter_batches(5, **kwargs))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_round_trip_with_tau(tmp_path, dtype):
    xs = [torch.randn(n, D) for n in (3, 10, 1, 7)]
    taus = [torch.rand(n) for n in (3, 10, 1, 7)]
    store = ActivationStore.create(
        tmp_path / "s", d_in=D, dtype=dtype, shard_rows=4, metadata={"hookpoint": "unet.mid_block"}
    )
    for x, t in zip(xs, taus):
        store.append(x, tau=t)
    assert len(store) == 21 and store.num_shards == 5  # 20 rows flushed, 1 buffered
    store.close()
    again = ActivationStore(tmp_path / "s")
    assert (len(again), again.d_in, again.dtype, again.num_shards) == (21, D, dtype, 6)
    assert again.metadata == {"hookpoint": "unet.mid_block"}
    x, tau = again.read_all(with_tau=True)
    assert x.dtype == dtype and torch.equal(x, torch.cat(xs).to(dtype))
    assert torch.equal(tau, torch.cat(taus))
    assert torch.equal(again.read_all(limit=5), x[:5])
    assert torch.equal(torch.cat(list(again.iter_batches(4, shuffle=False, dtype=dtype))), x)


def test_scalar_tau_and_leading_dims(tmp_path):
    store = ActivationStore.create(tmp_path, d_in=D)
    batch = torch.randn(2, 3, D)
    store.append(batch, tau=0.25)
    expected, _ = batch.reshape(6, D).half(), batch.zero_()  # a caller reusing its buffer
    x, tau = store.read_all(with_tau=True)
    assert torch.equal(x, expected) and torch.equal(tau, torch.full((6,), 0.25))


def test_shuffled_epoch_returns_every_row_once(tmp_path):
    store = make_store(tmp_path)
    batches = collect(store, buffer_shards=2, with_tau=True)
    assert [b[0].shape[0] for b in batches] == [5] * 10 + [3]
    x = torch.cat([b[0] for b in batches])
    tau = torch.cat([b[1] for b in batches])
    ids = x[:, 0]
    assert not torch.equal(ids, torch.arange(53.0))  # actually shuffled
    order = ids.argsort()
    assert torch.equal(x[order], store.read_all())  # every row once, rows intact
    assert torch.equal(tau, ids / 53)  # τ travels with its row
    assert sum(b.shape[0] for b in collect(store, drop_last=True)) == 50


def test_same_seed_same_sequence(tmp_path):
    store = make_store(tmp_path)
    a, b = collect(store, seed=3), collect(store, seed=3)
    assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True))
    assert not torch.equal(torch.cat(a), torch.cat(collect(store, seed=4)))
    two = collect(store, seed=3, epochs=2)
    assert torch.equal(torch.cat(two), torch.cat(a + collect(store, seed=4)))


@pytest.mark.parametrize("shuffle", [True, False])
@pytest.mark.parametrize("drop_last", [True, False])
def test_start_batch_equals_dropping_batches(tmp_path, shuffle, drop_last):
    store = make_store(tmp_path)
    kw = {"shuffle": shuffle, "drop_last": drop_last, "buffer_shards": 3, "epochs": 2, "with_tau": True}
    full = collect(store, **kw)
    for n in (0, 1, 3, 7, 10, 11, 12, len(full) - 1, len(full), len(full) + 5):
        got = collect(store, start_batch=n, **kw)
        assert len(got) == max(len(full) - n, 0)
        for (x, t), (y, u) in zip(got, full[n:], strict=True):
            assert torch.equal(x, y) and torch.equal(t, u)


def test_start_batch_skips_without_loading(tmp_path, monkeypatch):
    store = make_store(tmp_path, n=64)  # 8 shards of 8 rows
    loaded = []
    load = ActivationStore._load
    monkeypatch.setattr(ActivationStore, "_load", lambda self, s, t: loaded.append(s) or load(self, s, t))
    assert len(collect(store, buffer_shards=2, start_batch=11)) == 2
    assert len(loaded) == 2  # only the last group of two shards was read


def test_reopen_appends_continue(tmp_path):
    make_store(tmp_path, n=20)
    with ActivationStore(tmp_path) as store:
        store.append(rows(9, 20), tau=torch.zeros(9))
    store = ActivationStore(tmp_path)
    assert len(store) == 29
    assert torch.equal(store.read_all()[:, 0], torch.arange(29.0))
    names = sorted(p.name for p in tmp_path.glob("shard-*"))
    assert names == [f"shard-{i:06d}.safetensors" for i in range(len(names))]


def test_crash_between_shard_and_manifest(tmp_path, monkeypatch):
    make_store(tmp_path, n=20, tau=False)
    store = ActivationStore(tmp_path)

    def crash(*args, **kwargs):
        raise RuntimeError("power cut")

    monkeypatch.setattr(ActivationStore, "_write_manifest", crash)
    store.append(rows(4, 20))
    with pytest.raises(RuntimeError, match="power cut"):
        store.flush()
    monkeypatch.undo()
    orphans = {p.name for p in tmp_path.glob("shard-*")} - {s.file for s in ActivationStore(tmp_path)._shards}
    assert len(orphans) == 1  # the shard reached disk, the manifest never named it
    reopened = ActivationStore(tmp_path)
    assert len(reopened) == 20
    assert torch.equal(torch.cat(collect(reopened, shuffle=False))[:, 0], torch.arange(20.0))
    reopened.append(rows(3, 20))
    reopened.close()
    assert torch.equal(ActivationStore(tmp_path).read_all()[:, 0], torch.arange(23.0))


def test_orphan_temp_files_are_ignored_then_removed(tmp_path):
    make_store(tmp_path, n=10, tau=False)
    junk = [
        tmp_path / "shard-000099.safetensors.tmp",
        tmp_path / "shard-000007.safetensors",
        tmp_path / "manifest.json.tmp",
    ]
    for p in junk:
        p.write_bytes(b"half-written")
    store = ActivationStore(tmp_path)
    assert len(store) == 10 and torch.equal(store.read_all()[:, 0], torch.arange(10.0))
    store.append(rows(2, 10))
    store.close()
    assert not any(p.exists() for p in junk)
    assert torch.equal(ActivationStore(tmp_path).read_all()[:, 0], torch.arange(12.0))


def test_keys_are_recorded_once_durable(tmp_path):
    store = ActivationStore.create(tmp_path, d_in=D, shard_rows=4)
    store.append(torch.randn(3, D), key="prompt-0")
    assert store.has_key("prompt-0") and store.keys == frozenset()
    assert not ActivationStore(tmp_path).has_key("prompt-0")  # still only in RAM
    store.append(torch.randn(3, D), key="prompt-1")  # a shard of 4 rows is flushed
    assert store.keys == {"prompt-0"}
    store.close()
    assert ActivationStore(tmp_path).keys == {"prompt-0", "prompt-1"}


def test_bad_inputs_give_clear_errors(tmp_path):
    store = ActivationStore.create(tmp_path / "s", d_in=D, dtype=torch.float16)
    with pytest.raises(ValueError, match="is empty"):
        store.iter_batches(4)
    with pytest.raises(ValueError, match=r"width 5 .*d_in=6"):
        store.append(torch.randn(3, 5))
    with pytest.raises(ValueError, match="activations contain NaN/inf"):
        store.append(torch.tensor([[float("nan")] * D]))
    with pytest.raises(ValueError, match="activations contain NaN/inf after casting"):
        store.append(torch.full((1, D), 1e6))  # overflows float16
    with pytest.raises(ValueError, match="tau has 2 values but the batch has 3 rows"):
        store.append(torch.randn(3, D), tau=torch.rand(2))
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        store.append(torch.randn(1, D), tau=1.5)
    store.append(torch.randn(2, D))
    with pytest.raises(ValueError, match="no τ column"):
        store.append(torch.randn(2, D), tau=0.5)
    with pytest.raises(ValueError, match="no τ column"):
        store.read_all(with_tau=True)
    with pytest.raises(FileExistsError, match="already exists"):
        ActivationStore.create(tmp_path / "s", d_in=D)
    with pytest.raises(ActivationStoreError, match="d_in=6"):
        ActivationStore.create(tmp_path / "s", d_in=8, exist_ok=True)


def test_bad_folders_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no activation store .*does not exist"):
        ActivationStore(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match=r"manifest\.json not found"):
        ActivationStore(tmp_path)
    (tmp_path / "manifest.json").write_text('{"d_in": 4')
    with pytest.raises(ActivationStoreError, match="not valid JSON"):
        ActivationStore(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"d_in": 4}))
    with pytest.raises(ActivationStoreError, match="not an activation store"):
        ActivationStore(tmp_path)
    make_store(tmp_path / "s", n=10)
    (tmp_path / "s" / "shard-000000.safetensors").unlink()
    with pytest.raises(ActivationStoreError, match="missing shards"):
        ActivationStore(tmp_path / "s")


def keyed_store(path, units: range, rows_per_unit: int = 3) -> ActivationStore:
    """A store of keyed units ``u{i}`` (a collection's prompts), ``rows_per_unit`` rows each."""
    store = ActivationStore.create(path, d_in=D, dtype=torch.float32, shard_rows=4, exist_ok=True)
    for i in units:
        store.append(rows(rows_per_unit, 100 * i), tau=0.5, key=f"u{i}")
    store.flush()
    return store


def ids(store: ActivationStore) -> list[int]:
    return sorted(int(v) for v in store.read_all()[:, 0])


def test_parts_of_a_multiprocess_collection_are_absorbed_whole(tmp_path):
    main = keyed_store(tmp_path / "s", range(2))
    keyed_store(main.part(0).path, range(2, 5))
    keyed_store(main.part(1).path, range(5, 7))
    assert main.absorb_parts() == 5 * 3
    again = ActivationStore(tmp_path / "s")
    assert again.keys == {f"u{i}" for i in range(7)} and len(again) == 21
    assert ids(again) == sorted(100 * i + j for i in range(7) for j in range(3))
    assert not (tmp_path / "s" / "parts").exists()
    assert again.absorb_parts() == 0  # nothing left


def test_absorb_survives_a_crash_at_any_point(tmp_path, monkeypatch):
    main = keyed_store(tmp_path / "s", range(2))
    part = keyed_store(main.part(1).path, range(2, 4))

    def fail(*_a, **_k):
        raise OSError("disk full")

    # crash before the manifest names the new shards: the store is as it was, the part intact
    monkeypatch.setattr(main, "_write_manifest", fail)
    with pytest.raises(OSError, match="disk full"):
        main.absorb(part.path)
    monkeypatch.undo()
    reopened = ActivationStore(tmp_path / "s")
    assert len(reopened) == 6 and ActivationStore(part.path).keys == {"u2", "u3"}
    # crash after the manifest write, before the part is deleted: the rerun only deletes it
    monkeypatch.setattr("saeuron_plugin.sae.store.shutil.rmtree", fail)
    with pytest.raises(OSError, match="disk full"):
        reopened.absorb(part.path)
    monkeypatch.undo()
    final = ActivationStore(tmp_path / "s")
    assert final.absorb_parts() == 0
    assert len(final) == 12 and ids(final) == sorted(100 * i + j for i in range(4) for j in range(3))
    assert not part.path.exists() and not (tmp_path / "s" / "parts").exists()  # the renamed leftover too


def test_leftover_parts_are_merged_by_any_later_open_and_empty_ones_dropped(tmp_path):
    from saeuron_plugin.sae.store import open_stores

    main = keyed_store(tmp_path / "hp", range(2))
    keyed_store(main.part(0).path, range(2, 3))
    (tmp_path / "hp" / "parts" / "rank-00001").mkdir()  # created, crashed before its manifest
    (tmp_path / "hp" / "parts" / "rank-00001" / "shard-000000.safetensors.tmp").write_bytes(b"x")
    stores = open_stores(tmp_path, {"hp": (D, {})}, torch.float32)  # a plain, one-process collection
    assert stores["hp"].keys == {"u0", "u1", "u2"} and len(stores["hp"]) == 9
    assert not (tmp_path / "hp" / "parts").exists()


def test_absorb_refuses_what_would_duplicate_or_not_fit(tmp_path):
    main = keyed_store(tmp_path / "s", range(3))
    overlapping = keyed_store(tmp_path / "p", range(2, 5))
    with pytest.raises(ActivationStoreError, match="both hold keys"):
        main.absorb(overlapping.path)
    wide = ActivationStore.create(tmp_path / "w", d_in=D + 1, dtype=torch.float32)
    with pytest.raises(ActivationStoreError, match="cannot merge"):
        main.absorb(wide.path)
    assert len(ActivationStore(tmp_path / "s")) == 9
