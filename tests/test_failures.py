"""Nothing lost, every bad input a clear error (issue #17).

* an interrupted keyed collection (a real subprocess, SIGKILL at any store write) resumes to exactly
  what an uninterrupted run writes, for any shard size: property-tested;
* every file we read × every corruption ends in one error of our family naming the file;
* divergent training writes nothing non-finite; a failing statistics pass changes nothing;
* bad strengths, NaN statistics and mistyped cfg.json values are refused where they enter.
"""

from __future__ import annotations

import json
import math
import pickle
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from saeuron_plugin.errors import BadFileError, NonFiniteError, SAeUronError, TrainingDivergedError
from saeuron_plugin.sae.concepts import ConceptLibrary, TauGrid
from saeuron_plugin.sae.model import SaeConfig, SparseAutoencoder
from saeuron_plugin.sae.store import ActivationStore
from saeuron_plugin.sae.train import train_sae

SCRIPT = Path(__file__).parent / "scripts" / "keyed_collect.py"


# ------------------------------------------------------------------ 1. interrupted collection resumes
def _run(store: Path, shard_rows: int, units: list[int], kill_at: int | None = None) -> int:
    args = [sys.executable, str(SCRIPT), str(store), str(shard_rows), ",".join(map(str, units))]
    if kill_at is not None:
        args.append(str(kill_at))
    done = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert done.returncode in (0, -signal.SIGKILL), done.stderr[-2000:]
    return done.returncode


def _contents(path: Path) -> tuple[torch.Tensor, torch.Tensor | None]:
    store = ActivationStore(path)
    return store.read_all(with_tau=True) if store.has_tau else (store.read_all(), None)


def _uninterrupted(tmp: Path, shard_rows: int, units: list[int]) -> tuple[torch.Tensor, torch.Tensor | None]:
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        from keyed_collect import D, unit_rows
    finally:
        sys.path.remove(str(SCRIPT.parent))
    with ActivationStore.create(tmp, d_in=D, dtype=torch.float32, shard_rows=shard_rows) as store:
        for i, n in enumerate(units):
            store.append(unit_rows(i, n), tau=torch.full((n,), i / len(units)), key=f"{i}:unit")
    return _contents(tmp)


def check_resume(tmp: Path, shard_rows: int, units: list[int], kill_at: int) -> None:
    expected_x, expected_tau = _uninterrupted(tmp / "reference", shard_rows, units)
    store = tmp / "killed"
    _run(store, shard_rows, units, kill_at)
    assert _run(store, shard_rows, units) == 0  # resume, uninterrupted
    x, tau = _contents(store)
    assert x.shape == expected_x.shape, (x[:, 0].tolist(), expected_x[:, 0].tolist())
    assert torch.equal(x, expected_x)
    assert (tau is None and expected_tau is None) or torch.equal(tau, expected_tau)


def test_resume_after_a_kill_mid_unit_has_no_duplicates(tmp_path):
    """The issue's case: a shard boundary inside a unit (48 rows per prompt, 100-row shards)."""
    check_resume(tmp_path, 100, [48] * 6, kill_at=25)  # killed after a shard that ends mid-unit


UNITS = st.lists(st.integers(0, 30), min_size=1, max_size=8)


@settings(max_examples=3, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(shard_rows=st.integers(1, 40), units=UNITS, kill_at=st.integers(1, 80))
def test_resume_equals_uninterrupted_run(tmp_path_factory, shard_rows, units, kill_at):
    check_resume(tmp_path_factory.mktemp("resume"), shard_rows, units, kill_at)


@pytest.mark.slow
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(shard_rows=st.integers(1, 40), units=UNITS, kill_at=st.integers(1, 80))
def test_resume_equals_uninterrupted_run_many(tmp_path_factory, shard_rows, units, kill_at):
    check_resume(tmp_path_factory.mktemp("resume"), shard_rows, units, kill_at)


def test_keyed_shards_end_at_key_boundaries(tmp_path):
    store = ActivationStore.create(tmp_path, d_in=2, dtype=torch.float32, shard_rows=10)
    for i in range(5):
        store.append(torch.full((7, 2), float(i)), key=f"k{i}")
    # a shard never ends inside a unit: 7 rows (the 14-row cut would split unit 1), then 7 ...
    assert [s.rows for s in store._shards] == [7, 7, 7, 7]
    assert store.keys == {"k0", "k1", "k2", "k3"}
    big = ActivationStore.create(tmp_path / "big", d_in=2, dtype=torch.float32, shard_rows=4)
    big.append(torch.zeros(3, 2))  # rows of a unit whose key comes with its last append
    assert big.num_shards == 0
    big.append(torch.ones(1, 2), key="first")  # now the 4-row shard holds a whole unit
    assert big.num_shards == 1 and big.keys == {"first"}
    big.append(torch.ones(9, 2))  # longer than a shard: waits for its key
    assert big.num_shards == 1
    big.append(torch.ones(1, 2), key="second")
    assert [s.rows for s in big._shards] == [4, 10] and big.keys == {"first", "second"}


def test_manifest_with_nonpositive_shard_rows_is_refused_not_a_hang(tmp_path):
    ActivationStore.create(tmp_path, d_in=3).close()
    manifest = tmp_path / "manifest.json"
    for bad in (0, -5, 2.5, "10", True):
        raw = json.loads(manifest.read_text())
        raw["shard_rows"] = bad
        manifest.write_text(json.dumps(raw))
        with pytest.raises(BadFileError, match="shard_rows") as err:
            ActivationStore(tmp_path)
        assert str(manifest) in str(err.value)
    with pytest.raises(ValueError, match="shard_rows"):
        ActivationStore.create(tmp_path / "new", d_in=3, shard_rows=0)


def test_a_truncated_shard_is_found_when_the_store_opens(tmp_path):
    with ActivationStore.create(tmp_path, d_in=4, dtype=torch.float32, shard_rows=8) as store:
        store.append(torch.randn(20, 4), tau=torch.rand(20))
    shard = tmp_path / "shard-000001.safetensors"
    shard.write_bytes(shard.read_bytes()[:-16])
    with pytest.raises(BadFileError) as err:
        ActivationStore(tmp_path)
    assert str(shard) in str(err.value)


# ------------------------------------------------------------------ 2. divergence
def test_divergent_training_stops_and_writes_nothing_non_finite(tmp_path):
    torch.manual_seed(0)
    calm = [torch.randn(64, 8) for _ in range(6)]
    wild = [torch.randn(64, 8) * 1e30 for _ in range(6)]  # finite inputs, overflowing squares
    ckpt = tmp_path / "ckpt"
    with pytest.raises(TrainingDivergedError, match=r"step 6") as err:
        train_sae(
            calm + wild,
            num_latents=32,
            k=4,
            batch_size=64,
            steps=12,
            progress=False,
            checkpoint_dir=str(ckpt),
            checkpoint_every=2,
        )
    assert "last finite checkpoint" in str(err.value)
    saved = load_file(str(ckpt / "trainer.safetensors"))
    assert all(bool(torch.isfinite(t).all()) for t in saved.values() if t.is_floating_point())
    assert json.loads((ckpt / "trainer_state.json").read_text())["state"]["step"] == 6
    with pytest.raises(TrainingDivergedError, match=r"step 0.*nothing was saved"):
        train_sae(wild, num_latents=32, k=4, batch_size=64, steps=6, progress=False)


def test_a_non_finite_sae_is_never_written(tmp_path):
    sae = SparseAutoencoder(SaeConfig(d_in=4, num_latents=8, k=2))
    with torch.no_grad():
        sae.W_dec[0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="W_dec"):
        sae.save_pretrained(tmp_path / "sae")
    assert not (tmp_path / "sae" / "sae.safetensors").exists()


# ------------------------------------------------------------------ 3. transactional statistics pass
def _library_state(eraser) -> dict:
    out = {}
    for path, entry in eraser.hookpoints.items():
        lib = entry.library
        items = [*((n, lib.get(n)) for n in lib.names), ("<bg>", lib.background)]
        out[path] = {
            n: None if s is None else (s.sums.clone(), s.counts.clone(), list(s.prompts or []), s.num_prompts)
            for n, s in items
        }
        out[path]["<theta>"] = lib.calibrated_threshold
    return out


def _same_state(a: dict, b: dict) -> bool:
    if a.keys() != b.keys():
        return False
    for path in a:
        if a[path].keys() != b[path].keys():
            return False
        for name, x in a[path].items():
            y = b[path][name]
            if name == "<theta>" or x is None or y is None:
                if x != y:
                    return False
            elif not (torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) and x[2:] == y[2:]):
                return False
    return True


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("concept", ["red", "green", None])
def test_a_failing_statistics_pass_changes_nothing(tmp_path, concept):
    from test_unlearn import BLOCK, STEPS, make_eraser
    from tiny_pipelines import tiny_sd_pipeline

    pipe = tiny_sd_pipeline()
    eraser = make_eraser(pipe, [BLOCK])
    eraser.save_pretrained(tmp_path / "before")
    before = _library_state(eraser)
    calls = [0]
    original = pipe.unet.forward

    def failing(*args, **kwargs):
        calls[0] += 1
        if calls[0] == 5:  # mid-pass: the first prompt's samples are already in
            raise RuntimeError("out of memory (simulated)")
        return original(*args, **kwargs)

    pipe.unet.forward = failing
    with pytest.raises(RuntimeError, match="simulated"):
        eraser.add_concept(
            concept,
            ["a red star", "a green square", "a blue circle"],
            pipe,
            num_inference_steps=STEPS,
            show_progress=False,
        )
    del pipe.unet.forward
    assert _same_state(before, _library_state(eraser))
    assert "green" not in eraser.concepts
    eraser.save_pretrained(tmp_path / "after")
    assert _files(tmp_path / "before") == _files(tmp_path / "after")
    # and a pass that succeeds still lands
    eraser.add_concept("green", ["a green square"], pipe, num_inference_steps=STEPS, show_progress=False)
    assert "green" in eraser.concepts and eraser.hookpoints[BLOCK].library.get("green").num_prompts == 1


# ------------------------------------------------------------------ 4. bad strengths
@pytest.mark.parametrize("strength", [math.inf, -math.inf, math.nan, 1e9])
def test_non_finite_or_huge_strength_is_refused(strength):
    from saeuron_plugin.sae.ablation import ConceptAblation

    lib = ConceptLibrary(8, tau_grid=TauGrid(1))
    lib.accumulate("a", torch.rand(4, 8), None)
    lib.accumulate("b", torch.rand(4, 8), None)
    with pytest.raises(NonFiniteError, match="'a'"):
        ConceptAblation("a", strength=strength).resolve(lib)


# ------------------------------------------------------------------ 5. every file × every corruption
def _sae_folder(root: Path) -> Path:
    sae = SparseAutoencoder(SaeConfig(d_in=4, num_latents=8, k=2))
    sae.save_pretrained(root / "sae")
    return root / "sae"


def _library_folder(root: Path) -> Path:
    lib = ConceptLibrary(8, tau_grid=TauGrid(2), d_in=4)
    lib.accumulate("star", torch.rand(3, 8), 0.2, prompts=["a star"])
    lib.accumulate("square", torch.rand(3, 8), 0.7, prompts=["a square"])
    lib.save(root / "lib")
    return root / "lib"


def _store_folder(root: Path) -> Path:
    with ActivationStore.create(root / "store", d_in=4, dtype=torch.float32, shard_rows=8) as s:
        s.append(torch.randn(12, 4), tau=torch.rand(12))
    return root / "store"


def _checkpoint_folder(root: Path) -> Path:
    train_sae(
        [torch.randn(32, 4) for _ in range(2)],
        num_latents=8,
        k=2,
        batch_size=32,
        steps=2,
        progress=False,
        checkpoint_dir=str(root / "ckpt"),
    )
    return root / "ckpt"


def _resume(folder: Path) -> None:
    train_sae(
        [torch.randn(32, 4) for _ in range(4)],
        num_latents=8,
        k=2,
        batch_size=32,
        steps=4,
        progress=False,
        checkpoint_dir=str(folder),
        resume=True,
    )


def _read_store(folder: Path) -> None:
    list(ActivationStore(folder).iter_batches(4))


# name -> (build the folder, file inside it, read it back, JSON field to drop, JSON field to mistype)
KINDS = {
    "sae cfg.json": (_sae_folder, "cfg.json", SparseAutoencoder.from_pretrained, "d_in", "k"),
    "sae weights": (_sae_folder, "sae.safetensors", SparseAutoencoder.from_pretrained, None, None),
    "concept statistics": (_library_folder, "concepts/star.safetensors", ConceptLibrary.load, None, None),
    "concept index": (_library_folder, "concepts/index.json", ConceptLibrary.load, "num_latents", "tau_grid"),
    "store manifest": (_store_folder, "manifest.json", _read_store, "d_in", "shards"),
    "store shard": (_store_folder, "shard-000000.safetensors", _read_store, None, None),
    "checkpoint state": (_checkpoint_folder, "trainer_state.json", _resume, "state", "sae_config"),
    "checkpoint tensors": (_checkpoint_folder, "trainer.safetensors", _resume, None, None),
}


def _corrupt(path: Path, how: str, drop: str | None, mistype: str | None) -> None:
    """Damage ``path`` the way ``how`` says."""
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "zero bytes":
        path.write_bytes(b"")
    elif how == "random bytes":
        path.write_bytes(
            torch.randint(0, 256, (len(data),), generator=torch.Generator().manual_seed(1))
            .to(torch.uint8)
            .numpy()
            .tobytes()
        )
    elif how == "a pickle":
        path.write_bytes(pickle.dumps({"W_dec": [1.0, 2.0], "d_in": 4}))
    elif how == "wrong JSON type":
        path.write_text("[1, 2, 3]")
    elif how == "missing field":
        raw = json.loads(data)
        raw.pop(drop)
        path.write_text(json.dumps(raw))
    elif how == "field of the wrong type":
        raw = json.loads(data)
        raw[mistype] = "oops"
        path.write_text(json.dumps(raw))
    elif how == "NaN values":
        tensors = load_file(str(path))
        name = max((n for n, t in tensors.items() if t.is_floating_point()), key=lambda n: tensors[n].numel())
        tensors[name] = tensors[name].clone()
        tensors[name].view(-1)[0] = float("nan")
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata()
        save_file(tensors, str(path), metadata=meta)


COMMON = ["truncated", "zero bytes", "random bytes", "a pickle"]
CORRUPTIONS = {
    ".json": [*COMMON, "wrong JSON type", "missing field", "field of the wrong type"],
    ".safetensors": [*COMMON, "NaN values"],
}
CASES = [(kind, how) for kind, spec in KINDS.items() for how in CORRUPTIONS[Path(spec[1]).suffix]]


@pytest.mark.parametrize(("kind", "how"), CASES)
def test_every_bad_file_is_one_clear_error_naming_it(tmp_path, kind, how):
    build, name, read, drop, mistype = KINDS[kind]
    folder = build(tmp_path)
    target = folder / name
    _corrupt(target, how, drop, mistype)
    with pytest.raises(SAeUronError) as err:
        read(folder)
    assert target.name in str(err.value), str(err.value)
    assert "Traceback" not in str(err.value) and "\n" not in str(err.value).strip()


def test_nan_concept_statistics_are_refused_naming_the_field(tmp_path):
    folder = _library_folder(tmp_path)
    _corrupt(folder / "concepts" / "star.safetensors", "NaN values", None, None)
    with pytest.raises(BadFileError) as err:
        ConceptLibrary.load(folder)
    assert err.value.field == "sums" and "star.safetensors" in err.value.path


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("k", "8"),
        ("k", 8.5),
        ("threshold", "abc"),
        ("d_in", 32.0),
        ("input_unit_norm", "yes"),
        ("threshold", float("inf")),
    ],
)
def test_mistyped_cfg_values_are_refused_naming_the_field(tmp_path, field, value):
    folder = _sae_folder(tmp_path)
    raw = json.loads((folder / "cfg.json").read_text())
    raw[field] = value
    (folder / "cfg.json").write_text(json.dumps(raw))
    with pytest.raises(SAeUronError, match=f"'{field}'") as err:
        SparseAutoencoder.from_pretrained(folder)
    assert "cfg.json" in str(err.value)


def test_library_for_another_sae_names_the_hookpoint_folder(tmp_path):
    folder = _library_folder(tmp_path)
    other = SparseAutoencoder(SaeConfig(d_in=4, num_latents=16, k=2))
    with pytest.raises(SAeUronError) as err:
        ConceptLibrary.load(folder, other)
    assert str(folder / "concepts" / "index.json") in str(err.value)


# ------------------------------------------------------------------ 6. the CLI: early checks, one line
def test_cli_unknown_concept_fails_before_the_model_loads(tmp_path, capsys, monkeypatch):
    from saeuron_plugin.cli import main
    from saeuron_plugin.diffusion import commands

    bundle = tmp_path / "bundle"
    hp = "unet.up_blocks.1.attentions.1"
    from saeuron_plugin import SAeUron

    sae = SparseAutoencoder(SaeConfig(d_in=4, num_latents=8, k=2))
    eraser = SAeUron.from_saes({hp: sae}, tau_grid=TauGrid(2))
    lib = eraser.hookpoints[hp].library
    lib.accumulate("red", torch.rand(2, 8), 0.3)
    lib.accumulate("blue", torch.rand(2, 8), 0.3)
    eraser.save_pretrained(bundle)

    def no_model(*a, **k):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(commands, "load_pipeline", no_model)
    code = main(
        ["generate", "--model", "m", "--sae", str(bundle), "--unlearn", "rde", "--prompt", "x", "--compare"]
    )
    err = capsys.readouterr().err
    assert code == 2 and "rde" in err and "red" in err and "Traceback" not in err
    code = main(
        [
            "generate",
            "--model",
            "m",
            "--sae",
            str(bundle),
            "--unlearn",
            "red",
            "--strength",
            "inf",
            "--prompt",
            "x",
        ]
    )
    assert code == 2 and "finite" in capsys.readouterr().err
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing here\n\n")
    code = main(
        ["concept", "add", "--model", "m", "--sae", str(bundle), "--name", "green", "--prompts", str(empty)]
    )
    assert code == 2 and "no prompts" in capsys.readouterr().err


def test_cli_bad_file_is_one_line_and_debug_shows_the_traceback(tmp_path, capsys):
    from saeuron_plugin.cli import main

    folder = _sae_folder(tmp_path)
    (folder / "sae.safetensors").write_bytes(pickle.dumps([1, 2, 3]))
    assert main(["info", str(folder)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "sae.safetensors" in err and "Traceback" not in err
    with pytest.raises(SAeUronError):
        main(["info", str(folder), "--debug"])
    with pytest.raises(SAeUronError):
        main(["--debug", "info", str(folder)])


def test_every_error_class_is_in_the_family():
    import importlib
    import inspect

    modules = [
        "saeuron_plugin.errors",
        "saeuron_plugin.sae.model",
        "saeuron_plugin.sae.io",
        "saeuron_plugin.sae.bundle",
        "saeuron_plugin.sae.store",
        "saeuron_plugin.sae.train",
        "saeuron_plugin.sae.concepts",
        "saeuron_plugin.diffusion.hookpoints",
        "saeuron_plugin.diffusion.hooks",
        "saeuron_plugin.vlm.hookpoints",
        "saeuron_plugin.vlm.hooks",
        "saeuron_plugin.comfyui.patching",
    ]
    found = []
    for name in modules:
        module = importlib.import_module(name)
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if issubclass(cls, Exception) and cls.__module__ == name:
                found.append(cls)
                assert issubclass(cls, SAeUronError), cls
    assert len(found) >= 12
