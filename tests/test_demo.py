"""The shipped demo model and ``python -m fxcache demo``: assets, the trained model's quality, the quick run."""

from __future__ import annotations

import json
import math

import pytest
import torch

import fxcache
from fxcache.__main__ import main as cli_main
from fxcache.demo import run as demo
from fxcache.demo import toy


def test_shipped_weights_are_small_and_load():
    for name in ("demo_unet.safetensors", "demo_classifier.safetensors"):
        assert (toy.ASSETS / name).stat().st_size <= 5_000_000, f"{name} is over the 5 MB the package allows"
    assert "Held-out accuracy" in (toy.ASSETS / "MODEL_CARD.md").read_text().replace("held-out", "Held-out")
    unet = toy.load_demo_unet()
    assert unet.config.sample_size == toy.IMAGE_SIZE and not unet.training
    assert isinstance(toy.load_classifier(), toy.Classifier)


def test_demo_unet_branches_differ():
    unet = toy.load_demo_unet()
    branches = fxcache.explain(unet, torch.randn(2, 3, 32, 32), torch.tensor(500))
    assert len(branches) == 8  # conv_in + 4 layers + 3 downsamplers
    fractions = [b.flops_fraction for b in branches]
    assert fractions == sorted(fractions) and fractions[0] < 0.1 < fractions[1]


def test_shapes_are_deterministic_and_balanced():
    a, la = toy.shapes(300, seed=5)
    b, lb = toy.shapes(300, seed=5)
    assert torch.equal(a, b) and torch.equal(la, lb)
    assert not torch.equal(a, toy.shapes(300, seed=6)[0])
    assert set(la.tolist()) == set(range(len(toy.CLASSES)))


@torch.no_grad()
def test_trained_model_draws_recognisable_shapes():
    """The shipped U-Net is trained: the classifier recognises what it draws (random weights draw noise)."""
    pipe = demo._pipeline(torch.device("cpu"))
    images = demo._generate(pipe, batch=32, steps=20, seed=0)
    probs = toy.load_classifier()(images * 2 - 1).softmax(1)
    assert (probs.max(1).values > 0.9).float().mean() >= 0.5  # 0.69 measured for the shipped model


def test_quick_demo_end_to_end(tmp_path, capsys):
    grid, report = tmp_path / "grid.png", tmp_path / "out" / "demo.json"
    assert cli_main(["demo", "--quick", "--no-compile", "--out", str(grid), "--json", str(report)]) == 0
    out = capsys.readouterr().out
    assert "speed-up" in out and "b1 N5" in out and str(grid) in out

    from PIL import Image

    with Image.open(grid) as im:
        assert im.size[0] > 8 * 32 and im.size[1] > 3 * 32
    data = json.loads(report.read_text())
    rows = {r["setting"]: r for r in data["rows"]}
    assert list(rows) == ["uncached", "b0 N3", "b1 N5"]
    assert rows["uncached"]["psnr"] is None and rows["uncached"]["ssim"] == 1.0
    assert (rows["b0 N3"]["full_steps"], rows["b0 N3"]["shallow_steps"]) == (4, 6)
    assert (rows["b1 N5"]["full_steps"], rows["b1 N5"]["shallow_steps"]) == (2, 8)
    for r in (rows["b0 N3"], rows["b1 N5"]):
        assert 15 < r["psnr"] < 99 and 0 < r["ssim"] < 1 and math.isfinite(r["fd"]) and r["seconds"] > 0


def test_default_settings_cover_the_issue():
    labels = [s.label for s in demo.default_settings(25)]
    for b in (0, 1):
        for n in (2, 3, 5):
            assert f"b{b} N{n}" in labels
    assert "b0 N5 nonuniform" in labels and "b0 N5 nonuniform Eq.7" in labels
    assert any(s.compiled and s.cached for s in demo.default_settings(25))
    assert not any(s.compiled for s in demo.default_settings(25, compile=False))


def test_bad_arguments_say_what_to_do(capsys):
    with pytest.raises(SystemExit) as e:
        demo.main(["--steps", "1"])
    assert e.value.code == 2 and "--steps must be at least 2" in capsys.readouterr().err
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit) as e:
            demo.main(["--device", "cuda"])
        assert e.value.code == 2 and "use --device cpu" in capsys.readouterr().err
    with pytest.raises(ValueError, match="uncached eager baseline"):
        demo.run([demo.Setting("b0 N3", 0, 3)], samples=2, steps=2)


def test_training_script_is_deterministic():
    """scripts/train_demo_model.py gives the same weights for the same seed (a few steps of each stage)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "train_demo_model.py"
    spec = importlib.util.spec_from_file_location("train_demo_model", path)
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)
    x, y = toy.shapes(64, seed=0)
    runs = [train.train_unet(x, steps=2, batch=4, lr=1e-3, seed=0)[0].state_dict() for _ in range(2)]
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    clfs = [train.train_classifier(x, y, steps=2, seed=0)[0].state_dict() for _ in range(2)]
    assert all(torch.equal(clfs[0][k], clfs[1][k]) for k in clfs[0])
