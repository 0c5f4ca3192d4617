"""Data loading, the trainer (loss goes down, exact resume), checkpoints and their bad inputs."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from conftest import cli

from ddpm_deploy.errors import UserError
from ddpm_deploy.train.data import load_dataset

torch = pytest.importorskip("torch")


def test_digits_dataset():
    x = load_dataset("digits")
    assert x.shape[1:] == (1, 16, 16) and x.dtype == np.float32
    assert -1.0 <= x.min() and x.max() <= 1.0 and x.min() < -0.9 and x.max() > 0.9
    test = load_dataset("digits", 8, split="test")
    assert test.shape[1:] == (1, 8, 8) and len(test) == 1797 // 5 and len(x) + len(test) == 1797


def test_image_folder_and_npz(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    x = load_dataset(str(tmp_path))
    assert x.shape == (3, 3, 12, 12)
    np.savez(tmp_path / "a.npz", images=rng.integers(0, 255, (5, 10, 10), dtype=np.uint8))
    assert load_dataset(str(tmp_path / "a.npz"), 8).shape == (5, 1, 8, 8)


@pytest.mark.parametrize("make,msg", [
    (lambda d: "nosuchset", "unknown dataset"),
    (lambda d: str(d), "no PNG/JPEG images"),
    (lambda d: (d.joinpath("x.png").write_bytes(b"not a png"), str(d))[1], "cannot read image"),
    (lambda d: (np.savez(d / "b.npz", images=np.zeros((2, 3, 5, 7))), str(d / "b.npz"))[1], "square images"),
    (lambda d: (np.save(d / "c.npy", np.zeros(3)), str(d / "c.npy"))[1], "cannot read data"),
])
def test_bad_data(tmp_path, make, msg):
    with pytest.raises(UserError, match=msg):
        load_dataset(make(tmp_path))


def test_mixed_image_sizes(tmp_path):
    from PIL import Image

    Image.new("L", (8, 8)).save(tmp_path / "a.png")
    Image.new("L", (9, 9)).save(tmp_path / "b.png")
    with pytest.raises(UserError, match="mixed sizes"):
        load_dataset(str(tmp_path))


def _cfg(out, steps, **kw):
    from ddpm_deploy.train.trainer import TrainConfig

    return TrainConfig(data="digits", out=str(out), preset="tiny", image_size=8, num_train_timesteps=50, steps=steps,
                       batch_size=16, checkpoint_every=3, sample_n=0, threads=1, **kw)


def test_resume_is_exact(tmp_path):
    """6 steps straight == 3 steps, 'killed', then --resume to 6: same weights, EMA, optimizer, step."""
    from ddpm_deploy.train.trainer import Trainer

    straight = Trainer(_cfg(tmp_path / "a", 6), progress=False)
    straight.fit()
    Trainer(_cfg(tmp_path / "b", 3), progress=False).fit()
    resumed = Trainer(_cfg(tmp_path / "b", 6), resume=True, progress=False)
    assert resumed.step == 3
    resumed.fit()
    for a, b in zip(straight.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(a, b)
    for a, b in zip(straight.ema.state_dict().values(), resumed.ema.state_dict().values()):
        assert torch.equal(a, b)


def test_loss_decreases(tmp_path):
    from ddpm_deploy.train.trainer import Trainer

    tr = Trainer(_cfg(tmp_path, 60, lr=2e-3), progress=False)
    losses = [tr.loss_step() for _ in range(60)]
    assert np.mean(losses[-10:]) < 0.8 * np.mean(losses[:10])


def test_model_pt_is_weights_only(tiny_ckpt):
    obj = torch.load(tiny_ckpt, weights_only=True)
    assert obj["format"] == "ddpm-deploy/checkpoint" and "weights" in obj and "optimizer" not in obj


def test_train_cli_writes_model_and_grid(tmp_path):
    r = cli("train", "--out", str(tmp_path / "run"), "--preset", "tiny", "--image-size", "8", "-T", "20",
            "--steps", "3", "--batch-size", "4", "--sample-n", "4", "--threads", "1")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "run" / "model.pt").exists() and (tmp_path / "run" / "samples.png").exists()
    # the grid comes from the deployed path (temporary ONNX on onnxruntime, short sampler), not the torch module
    from ddpm_deploy.train.trainer import GRID_SAMPLING

    assert f"{GRID_SAMPLING['sampler']} 20 steps on onnxruntime-cpu" in r.stdout, r.stdout
    assert not list((tmp_path / "run").glob("*.onnx"))  # the temporary export is gone
    assert "torchvision" not in r.stderr and "Traceback" not in r.stderr


def test_train_grid_matches_the_runtime(tmp_path):
    """sample_grid == exporting model.pt and sampling it with `load` at the same seed (same images, exactly)."""
    from ddpm_deploy.export import onnx_from_checkpoint
    from ddpm_deploy.runtime import load
    from ddpm_deploy.train.trainer import GRID_SAMPLING, Trainer, sample_grid

    tr = Trainer(_cfg(tmp_path / "g", 3), progress=False)
    tr.fit()
    images, how = sample_grid(tr, 5, seed=2)
    onnx_from_checkpoint(str(tmp_path / "g" / "model.pt"), tmp_path / "m.onnx", max_batch=5, echo=lambda *_: None)
    with load(str(tmp_path / "m.onnx"), backend="onnxruntime") as pipe:
        want = pipe.sample(5, seed=2, **GRID_SAMPLING)
    assert images.shape == (5, 8, 8, 1) and images.dtype == np.uint8
    np.testing.assert_array_equal(images, want)
    assert how.startswith(f"{GRID_SAMPLING['sampler']} {GRID_SAMPLING['steps']} steps")


def test_resume_past_the_total_is_refused(tmp_path):
    from ddpm_deploy.train.trainer import Trainer

    Trainer(_cfg(tmp_path, 6), progress=False).fit()
    with pytest.raises(UserError, match="already at step 6 and --steps 4 is the total"):
        Trainer(_cfg(tmp_path, 4), resume=True, progress=False)


@pytest.mark.parametrize("args,msg", [
    (["train", "--data", "nosuch", "--out", "{d}/o"], "unknown dataset"),
    (["train", "--data", "{d}/empty", "--out", "{d}/o"], "no PNG/JPEG"),
    (["train", "--out", "{d}/o", "--resume"], "no .*checkpoint.pt to resume"),
    (["export", "{d}/notckpt.pt"], "not a readable checkpoint"),
    (["export", "{d}/pickled.pt"], "pickled Python objects"),
    (["export", "{d}/other.pt"], "not a ddpm-deploy checkpoint"),
    (["export", "{d}/missing.pt"], "not found"),
])
def test_bad_input_one_line(tmp_path, args, msg):
    (tmp_path / "empty").mkdir()
    (tmp_path / "notckpt.pt").write_bytes(b"garbage")
    torch.save({"cls": np.random.default_rng(0)}, tmp_path / "pickled.pt")  # a pickled class instance
    torch.save({"weights": {}}, tmp_path / "other.pt")
    r = cli(*[a.replace("{d}", str(tmp_path)) for a in args], cwd=tmp_path)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), r.stderr
    import re

    assert re.search(msg, lines[0]), lines[0]
    assert not (tmp_path / "o" / "model.pt").exists() and not list(tmp_path.glob("*.onnx"))


def test_shape_mismatch_checkpoint(tiny_ckpt, tmp_path):
    obj = torch.load(tiny_ckpt, weights_only=True)
    obj["unet"] = {**obj["unet"], "block_out_channels": [8, 32]}
    torch.save(obj, tmp_path / "bad.pt")
    r = cli("export", str(tmp_path / "bad.pt"), "-o", str(tmp_path / "bad.onnx"))
    assert r.returncode == 2 and "config and weights are not of the same model" in r.stderr
    assert not (tmp_path / "bad.onnx").exists()


def test_divergence_stops_before_anything_is_saved(tmp_path):
    """train --lr 1e30 (finite) wrote an all-NaN model.pt and exit 0: the run now stops at the step whose loss,
    gradient or weights are not finite, and the last checkpoint and model stay as they were."""
    from ddpm_deploy.train.trainer import Trainer

    Trainer(_cfg(tmp_path, 3), progress=False).fit()
    ckpt, model = (tmp_path / "checkpoint.pt").read_bytes(), (tmp_path / "model.pt").read_bytes()
    with pytest.raises(UserError, match=r"diverged at step [45]: the (loss|gradient norm) is nan"):
        Trainer(_cfg(tmp_path, 6, lr=1e30), resume=True, progress=False).fit()
    assert (tmp_path / "checkpoint.pt").read_bytes() == ckpt and (tmp_path / "model.pt").read_bytes() == model


@pytest.mark.parametrize("knob,word", [(dict(lr=float("nan")), "--lr"), (dict(lr=float("inf")), "--lr"),
                                       (dict(ema_decay=float("nan")), "--ema-decay"),
                                       (dict(ema_decay=5), "--ema-decay"),
                                       (dict(checkpoint_every=0), "--checkpoint-every")])
def test_knobs_out_of_range_are_refused_before_any_work(tmp_path, knob, word):
    from ddpm_deploy.train.trainer import Trainer

    cfg = _cfg(tmp_path / "out", 3)
    for k, v in knob.items():
        setattr(cfg, k, v)
    with pytest.raises(UserError, match=word):
        Trainer(cfg, progress=False)
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def trained3(tmp_path_factory):
    from ddpm_deploy.train.trainer import Trainer

    out = tmp_path_factory.mktemp("trained3")
    Trainer(_cfg(out, 3), progress=False).fit()
    return out


def _first(key, make):
    def edit(s):
        name = next(iter(s[key]))
        s[key][name] = make(s[key][name])
    return edit


TAMPERED = [
    (lambda s: s.__setitem__("step", -3), "field step"),
    (lambda s: s.__setitem__("step", 2.5), "field step"),
    (lambda s: s.pop("optimizer"), "no field 'optimizer'"),
    (lambda s: s.pop("rng"), "no field 'rng'"),
    (lambda s: s.__setitem__("rng", torch.zeros(4, dtype=torch.uint8)), "field rng"),
    (_first("raw_weights", lambda w: w.new_zeros(3)), "raw_weights["),
    (_first("weights", lambda w: torch.full_like(w, float("nan"))), "holds inf/NaN"),
    (lambda s: next(iter(s["optimizer"]["state"].values())).__setitem__("step", torch.tensor(7.0)), "taken 7.0 steps"),
]


@pytest.mark.parametrize("edit,words", TAMPERED, ids=[w + f"-{i}" for i, (_, w) in enumerate(TAMPERED)])
def test_resume_checks_every_field(trained3, tmp_path, edit, words):
    """train --resume loaded whatever the file held: wrong shapes or RNG state were tracebacks, a negative step ran
    from step -3; now each is one line before anything is loaded or written."""
    import shutil

    from ddpm_deploy.train.trainer import Trainer

    shutil.copytree(trained3, tmp_path / "run")
    path = tmp_path / "run" / "checkpoint.pt"
    state = torch.load(path, weights_only=True)
    edit(state)
    torch.save(state, path)
    with pytest.raises(UserError) as e:
        Trainer(_cfg(tmp_path / "run", 6), resume=True, progress=False)
    assert words in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_progress_and_summary_show_the_same_loss(tmp_path):
    """train's last progress line said `loss 0.3550` (mean of the last 100 batches, set after the line was written)
    and its summary `final loss 0.3293` (mean of the last 200): two figures, neither named. Both now show the loss
    EMA, labelled, and the last progress line carries the final figure."""
    import re

    r = cli("train", "--out", str(tmp_path / "run"), "--preset", "tiny", "--image-size", "8", "-T", "20",
            "--steps", "20", "--batch-size", "4", "--sample-n", "0", "--threads", "1")
    assert r.returncode == 0, r.stderr
    shown = re.findall(r"^train: 20/20 steps .*, loss EMA ([0-9.]+)$", r.stderr, re.M)
    summary = re.findall(r"\(loss EMA ([0-9.]+) over ~100 batches, as the progress shows; last batch [0-9.]+\)",
                         r.stdout)
    assert shown and summary and shown[-1] == summary[0], (r.stderr, r.stdout)


def test_loss_ema_carries_through_resume(tmp_path):
    """After --resume the shown loss restarted from the first few batches; the EMA is now saved with the checkpoint,
    so 3 steps + resume to 6 shows exactly what 6 steps straight show."""
    from ddpm_deploy.train.trainer import Trainer

    straight = Trainer(_cfg(tmp_path / "a", 6), progress=False).fit()
    first = Trainer(_cfg(tmp_path / "b", 3), progress=False).fit()
    resumed = Trainer(_cfg(tmp_path / "b", 6), resume=True, progress=False)
    assert resumed.loss_ema == first["loss_ema"]
    assert resumed.fit()["loss_ema"] == straight["loss_ema"]
