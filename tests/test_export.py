"""fxcache.export / fxcache.load: one AOTInductor package of a tiny U-Net, shared by every test (one export,
about 25 s on 2 cores), loaded in a fresh process that never imports diffusers or the model's code."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

import fxcache
from fxcache.export import PackageError, read_metadata
from tests.models import PlainUNet

pytestmark = [pytest.mark.slow, pytest.mark.compile]

BATCH, SIZE, STEPS, INTERVAL = 2, 16, 10, 3
# The fresh processes import this checkout's fxcache (not whichever one the interpreter has installed).
_FRESH_ENV = {
    **os.environ,
    "PYTHONPATH": os.pathsep.join(
        p for p in (str(Path(fxcache.__file__).parents[1]), os.environ.get("PYTHONPATH")) if p
    ),
}


def _timesteps() -> list[float]:
    return [float(t) for t in torch.linspace(999, 0, STEPS)]


def _generation(model, x: torch.Tensor) -> list[torch.Tensor]:
    """A toy sampler: every output of the model over one generation (the next input depends on it)."""
    outs = []
    with torch.no_grad():
        for t in _timesteps():
            out = model(x, torch.full((BATCH,), t))
            x = x - 0.1 * out
            outs.append(out)
    return outs


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module, torch.Tensor]:
    """The package every test shares. Before exporting, the module has run (it holds a plan) and then the model's
    parameters were replaced (``load_state_dict(..., assign=True)``): the package must hold the *new* weights
    (issue 26 item 3; ``test_export_follows_replaced_weights``), which every test below compares against."""
    torch.manual_seed(0)
    unet = PlainUNet().eval()
    x = torch.randn(BATCH, 3, SIZE, SIZE)
    t = torch.full((BATCH,), 999.0)
    cached = fxcache.transform(unet, branch=1, interval=INTERVAL)
    with torch.no_grad():
        cached(x, t)  # a plan for this signature, captured with the first weights
    old = {k: v.clone() for k, v in unet.state_dict().items()}
    unet.load_state_dict(PlainUNet().state_dict(), assign=True)  # another checkpoint: new Parameter objects
    path = fxcache.export(cached, tmp_path_factory.mktemp("pkg") / "plain.pt2", (x, t))
    unet.old_state = old  # for test_export_follows_replaced_weights
    return path, unet, x


def _with_metadata(src: Path, dst: Path, **changes: object) -> Path:
    """A copy of the package whose fxcache.json has ``changes`` (for the compatibility checks)."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for item in zin.infolist():
            data = zin.read(item.filename)
            if item.filename.endswith("/extra/fxcache.json"):
                data = json.dumps({**json.loads(data), **changes}).encode()
            zout.writestr(item, data)
    return dst


def test_package_layout(exported) -> None:
    """One file: both graphs, weights stored once (the shallow graph's are the full graph's), the metadata."""
    path, unet, _ = exported
    meta = read_metadata(path)
    assert meta["branch"] == 1 and meta["schedule"] == {"kind": "uniform", "interval": INTERVAL}, meta
    assert [x["name"] for x in meta["inputs"]] == ["args[0]", "args[1]"], meta["inputs"]
    assert meta["out_type"] == "tree" and meta["device"]["type"] == "cpu", meta
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
        configs = {
            g: json.loads(z.read(next(n for n in names if n.endswith(f"aotinductor/{g}/weights_config.json"))))
            for g in ("full", "shallow")
        }
        weight_files = [n for n in names if "/data/weights/" in n]
    full_files = {v[0] for v in configs["full"].values()}
    shallow_files = {v[0] for v in configs["shallow"].values()}
    assert shallow_files and shallow_files <= full_files, "the shallow graph reads the full graph's stored weights"
    assert len(weight_files) == len(full_files | shallow_files), "each weight is stored once"
    assert len(weight_files) <= sum(1 for _ in unet.parameters()), "no more stored tensors than parameters"


def test_fresh_process_matches_a_generation(exported, tmp_path: Path) -> None:
    """Loaded where neither diffusers nor the model's code was imported, two generations equal eager fxcache."""
    path, unet, x = exported
    out_file = tmp_path / "outs.pt"
    code = f"""
import sys, torch, fxcache
runner = fxcache.load({str(path)!r})
x0 = torch.load({str(tmp_path / "x.pt")!r})
outs = []
for _ in range(2):  # the timestep rises again: a second generation, as in-process
    x = x0
    for t in {_timesteps()!r}:
        with torch.no_grad():
            out = runner(x, torch.full(({BATCH},), t))
        x = x - 0.1 * out
        outs.append(out)
torch.save({{"outs": outs, "full": runner.fxcache_state.full_steps}}, {str(out_file)!r})
for name in ("diffusers", "tests.models", "tests"):
    assert name not in sys.modules, name + " was imported"
"""
    torch.save(x, tmp_path / "x.pt")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path, env=_FRESH_ENV)
    got = torch.load(out_file)
    reference = fxcache.transform(unet, branch=1, interval=INTERVAL)
    want = _generation(reference, x) + _generation(reference, x)
    assert got["full"] == reference.fxcache_state.full_steps == 2 * 4, (got["full"], reference.fxcache_state)
    for i, (a, b) in enumerate(zip(got["outs"], want, strict=True)):
        rel = ((a - b).abs().max() / b.abs().max()).item()
        assert rel < 1e-4, f"step {i % STEPS} of generation {i // STEPS}: relative error {rel:.2e}"


def test_export_follows_replaced_weights(exported) -> None:
    """Issue 26 item 3: parameters replaced after the module's first call (new Parameter objects) are what the
    package holds, not the weights the module's plan was captured with."""
    path, unet, x = exported
    t = torch.full((BATCH,), 999.0)
    with torch.no_grad():
        got = fxcache.load(path)(x, t)
        want = unet(x, t)
        old_unet = PlainUNet().eval()
        old_unet.load_state_dict(unet.old_state)
        stale = old_unet(x, t)
    assert not torch.allclose(want, stale), "the new weights must change the output (else this test tests nothing)"
    rel = ((got - want).abs().max() / want.abs().max()).item()
    assert rel < 1e-4, f"the package must run the current weights: relative error {rel:.2e} against the new model"


def _strided_like(x: torch.Tensor) -> dict[str, torch.Tensor]:
    """``x``'s values in layouts other than the contiguous one the package was compiled for."""
    wide = torch.zeros(*x.shape[:-1], 2 * x.shape[-1])
    wide[..., : x.shape[-1]] = x
    flat = torch.zeros(x.numel() + 1)
    flat[1:] = x.flatten()
    return {
        "channels_last": x.contiguous(memory_format=torch.channels_last),
        "transposed": x.transpose(2, 3).contiguous().transpose(2, 3),
        "sliced": wide[..., : x.shape[-1]],
        "offset by one element": flat[1:].view(x.shape),
    }


def test_strided_inputs_equal_contiguous_ones(exported) -> None:
    """Issue 26 item 4: the kernels assume the strides they were compiled for. A channels_last, transposed, sliced
    or offset sample and a stride-0 timestep (``t.expand(2)``, one stored element) give the contiguous inputs'
    outputs, full and shallow steps alike (they are copied into the compiled layout first)."""
    path, _, x = exported
    runner = fxcache.load(path)
    t = torch.full((BATCH,), 500.0)

    def two_steps(sample: torch.Tensor, step: torch.Tensor, next_step: torch.Tensor) -> list[torch.Tensor]:
        runner.reset()
        with torch.no_grad():
            return [runner(sample, step), runner(sample, next_step)]

    want = two_steps(x, t, t - 1)
    cases = {name: (xs, t, t - 1) for name, xs in _strided_like(x).items()}
    cases["stride-0 timestep"] = (x, torch.tensor([500.0]).expand(BATCH), torch.tensor([499.0]).expand(BATCH))
    wrong = []
    for name, (xs, t0, t1) in cases.items():
        assert torch.equal(xs, x) and torch.equal(t0, t), name
        got = two_steps(xs, t0, t1)
        for step, a, b in zip(("full", "shallow"), got, want, strict=True):
            if not torch.equal(a, b):
                wrong.append(f"{name} input, {step} step: {(a - b).abs().max().item():.3g} off")
    assert not wrong, "strided inputs must give the contiguous inputs' outputs: " + "; ".join(wrong)
    assert runner.fxcache_state.shallow_steps == len(cases) + 1, runner.fxcache_state
    assert read_metadata(path)["inputs"][0]["stride"] == list(x.stride()), "the compiled strides are recorded"


def test_cache_is_an_input_not_a_constant(exported) -> None:
    """A shallow step reads the latest full step's feature: after a full step on other inputs, it changes."""
    path, unet, x = exported
    runner = fxcache.load(path)
    t = torch.full((BATCH,), 500.0)
    with torch.no_grad():
        runner(x, t)
        first = runner(x, t - 1)  # shallow, from x's feature
        runner.reset()
        runner(torch.randn_like(x), t)
        second = runner(x, t - 1)  # shallow, from the other input's feature
    assert runner.fxcache_state.shallow_steps == 2, runner.fxcache_state
    assert not torch.allclose(first, second), "the shallow graph must read the cache, not a packaged constant"


def test_schedule_can_change_branch_cannot(exported) -> None:
    runner = fxcache.load(exported[0])
    assert runner.configure(interval=2).cache_config.interval == 2
    with pytest.raises(ValueError, match="branch cannot change"):
        runner.configure(branch=0)


def test_other_signature_names_the_input(exported) -> None:
    path, _, x = exported
    runner = fxcache.load(path)
    t = torch.full((BATCH,), 500.0)
    with pytest.raises(
        PackageError, match=r"input args\[0\] is a float32 tensor of shape \(1, 3, 16, 16\).*fxcache.export"
    ):
        runner(x[:1], t)
    with pytest.raises(PackageError, match=r"input args\[1\] is a float64 tensor"):
        runner(x, t.double())
    with pytest.raises(PackageError, match=r"exported for a call with inputs \(args\[0\], args\[1\]\).*extra"):
        runner(x, t, extra=None)
    assert runner.fxcache_state.full_steps == 0, "a refused call does not advance the state"
    with torch.no_grad():
        assert runner(x, t).shape == x.shape, "the runner still works after a refused call"


def test_other_device_kind_is_refused(exported, tmp_path: Path) -> None:
    path = exported[0]
    with pytest.raises(PackageError, match="holds kernels for cpu, not cuda"):
        fxcache.load(path, device="cuda")
    if not torch.cuda.is_available():
        cuda_pkg = _with_metadata(path, tmp_path / "cuda.pt2", device={"type": "cuda", "index": 0})
        with pytest.raises(PackageError, match="no CUDA device"):
            fxcache.load(cuda_pkg)


def test_format_1_package_loads_as_contiguous(exported, tmp_path: Path) -> None:
    """A package written before strides were recorded (format 1) still loads, read as compiled for contiguous
    inputs, and copies other layouts; an unknown format version is refused with what to do."""
    path, _, x = exported
    meta = read_metadata(path)
    unstrided = [{k: v for k, v in leaf.items() if k != "stride"} for leaf in meta["inputs"]]
    cache = {k: v for k, v in meta["cache"].items() if k != "stride"}
    old = _with_metadata(path, tmp_path / "v1.pt2", format_version=1, inputs=unstrided, cache=cache)
    assert read_metadata(old)["inputs"] == meta["inputs"], "format 1 reads as contiguous strides"
    runner, t = fxcache.load(old), torch.full((BATCH,), 500.0)
    with torch.no_grad():
        want = runner(x, t)
        runner.reset()
        assert torch.equal(runner(x.contiguous(memory_format=torch.channels_last), t), want)
    newer = _with_metadata(path, tmp_path / "v9.pt2", format_version=9)
    with pytest.raises(PackageError, match="version 9; this fxcache reads 'fxcache-aot' versions 1, 2. Export it"):
        fxcache.load(newer)


def test_other_torch_is_refused(exported, tmp_path: Path) -> None:
    old = _with_metadata(exported[0], tmp_path / "old.pt2", torch="2.5.1+cpu")
    with pytest.raises(PackageError, match=r"built with torch 2\.5\.1\+cpu; this is torch"):
        fxcache.load(old)


def test_truncated_corrupted_and_foreign_files(exported, tmp_path: Path) -> None:
    path = exported[0]
    data = path.read_bytes()
    truncated = tmp_path / "truncated.pt2"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(PackageError, match="truncated or corrupted"):
        fxcache.load(truncated)

    corrupted = tmp_path / "corrupted.pt2"
    shutil.copy(path, corrupted)
    with zipfile.ZipFile(path) as z:  # flip one byte inside the largest member (a shared library)
        info = max(z.infolist(), key=lambda i: i.compress_size)
    with corrupted.open("r+b") as fh:
        fh.seek(info.header_offset + 30 + len(info.filename) + len(info.extra) + info.compress_size // 2)
        byte = fh.read(1)
        fh.seek(-1, 1)
        fh.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(PackageError, match="corrupted"):
        fxcache.load(corrupted)

    foreign = tmp_path / "foreign.pt2"
    with zipfile.ZipFile(foreign, "w") as z:
        z.writestr("foreign/data.txt", "not a package")
    with pytest.raises(PackageError, match="not an fxcache package"):
        fxcache.load(foreign)
    with pytest.raises(PackageError, match="no fxcache package"):
        fxcache.load(tmp_path / "missing.pt2")


def test_export_refuses_before_compiling(tmp_path: Path) -> None:
    unet = PlainUNet().eval()
    x, t = torch.randn(1, 3, 16, 16), torch.full((1,), 1.0)
    with pytest.raises(ValueError, match="ending in .pt2"):
        fxcache.export(fxcache.transform(unet), tmp_path / "unet.zip", (x, t))
    with pytest.raises(ValueError, match="cannot save the schedule"):
        fxcache.export(fxcache.transform(unet, schedule=lambda s, n: s % 2 == 0), tmp_path / "u.pt2", (x, t))
    with pytest.raises(TypeError, match="takes the module fxcache.transform made"):
        fxcache.export(unet, tmp_path / "u.pt2", (x, t))
    assert not list(tmp_path.iterdir()), "nothing is written when export refuses"


def test_diffusers_unet_loads_without_diffusers(tmp_path: Path) -> None:
    """A diffusers UNet's output (UNet2DConditionOutput) comes back as the tuple ``(sample,)`` where diffusers
    is not imported, equal to the in-process eager transform over a generation."""
    from tests.models import sd_inputs, sd_unet

    unet = sd_unet(layers_per_block=1, blocks=2)
    (sample, _), kwargs = sd_inputs()
    path = fxcache.export(fxcache.transform(unet, branch=0, interval=2), tmp_path / "sd.pt2", (sample, 999), kwargs)
    assert read_metadata(path)["out_type"] == "tuple"
    torch.save({"sample": sample, **kwargs}, tmp_path / "inputs.pt")
    code = f"""
import sys, torch, fxcache
runner = fxcache.load({str(path)!r})
inputs = torch.load({str(tmp_path / "inputs.pt")!r})
x, outs = inputs.pop("sample"), []
for t in (999, 666, 333, 0):
    with torch.no_grad():
        out = runner(x, t, **inputs)
    assert isinstance(out, tuple) and len(out) == 1, type(out)
    x = x - 0.1 * out[0]
    outs.append(out[0])
torch.save(outs, {str(tmp_path / "outs.pt")!r})
assert "diffusers" not in sys.modules, "diffusers was imported"
"""
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path, env=_FRESH_ENV)
    got = torch.load(tmp_path / "outs.pt")
    reference, x = fxcache.transform(unet, branch=0, interval=2), sample
    for i, t in enumerate((999, 666, 333, 0)):
        with torch.no_grad():
            want = reference(x, t, **kwargs).sample
        rel = ((got[i] - want).abs().max() / want.abs().max()).item()
        assert rel < 1e-4, f"step {i}: relative error {rel:.2e}"
        x = x - 0.1 * want
