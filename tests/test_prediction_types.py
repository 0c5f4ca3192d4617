"""Prediction types (issue 23, part 1): a network that outputs eps, v or x_0 samples, exports, runs and verifies
through the same step and the same fused graph, with only the plan's rows changed; any beta table (a custom
schedule: trained_betas, `train --betas`) deploys like a named one.

Parity with diffusers per sampler and prediction type: tests/test_schedule_samplers.py (DDPM, DDIM) and
tests/test_fast_samplers.py (DPM-Solver++, SDE, UniPC; whole chains with the digits model as a v/x_0-predictor).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import TINY_T, assert_fused_walk_matches_numpy, assert_one_line_error, cli, fused_sessions

from ddpm_deploy.errors import UserError
from ddpm_deploy.sampling.likelihood import bits_per_dim
from ddpm_deploy.artifact.manifest import MANIFEST_KEY, Manifest
from ddpm_deploy.fused_io import N_HIST
from ddpm_deploy.sampling.plan import make_plan
from ddpm_deploy.sampling.step import step, step_with_history
from ddpm_deploy.sampling.schedule import CUSTOM, Schedule, ScheduleError
from ddpm_deploy.tolerances import FUSED_MULTISTEP_ATOL, SAMPLER_ATOL, SAMPLER_RTOL

PLANS = [  # (sampler, steps, make_plan keyword arguments): every sampler, variance type and history shape
    ("ddpm", None, {"variance_type": "fixed_small"}), ("ddpm", 10, {"variance_type": "fixed_large"}),
    ("ddpm", 10, {"variance_type": "learned_range"}), ("ddpm", 10, {"clip_sample": False}),
    ("ddim", 10, {"eta": 0.0}), ("ddim", 10, {"eta": 1.0, "clip_sample": False}),
    ("dpmpp", 8, {"order": 1}), ("dpmpp", 8, {"order": 2}), ("dpmpp", 8, {"order": 3}),
    ("dpmpp_sde", 8, {"order": 1}), ("dpmpp_sde", 8, {"order": 2}),
    ("unipc", 8, {"order": 2, "variant": "bh1"}), ("unipc", 8, {"order": 3, "variant": "bh2"}),
    ("lcm", 4, {}), ("lcm", 4, {"clip_sample": False}), ("lcm", 1, {}),
]


def _as(prediction_type, eps, x_t, ac_t):
    """The output a v- or x_0-network gives where an eps-network gives `eps` (float64)."""
    a, s = np.sqrt(ac_t), np.sqrt(1.0 - ac_t)
    x0 = (x_t - s * eps) / a
    return {"epsilon": eps, "v_prediction": a * eps - s * x0, "sample": x0}[prediction_type]


@pytest.mark.parametrize("prediction_type", ["v_prediction", "sample"])
@pytest.mark.parametrize("sampler,steps,kw", PLANS, ids=lambda v: str(v))
def test_rows_of_every_type_take_the_same_step(prediction_type, sampler, steps, kw):
    """The same model written as a v- or x_0-predictor takes the same step as its eps form: x_{t-1} and the history
    (x_0-predictions) agree along a chain, with the x_0 clip where it was, learned-variance channels and noise."""
    s = Schedule.build("linear", 100)
    eps_plan = make_plan(s, sampler, steps, **kw)
    plan = make_plan(s, sampler, steps, prediction_type=prediction_type, **kw)
    assert plan.prediction_type == prediction_type and eps_plan.prediction_type == "epsilon"
    assert not np.allclose(plan.coefs, eps_plan.coefs)  # other rows, same step
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 1, 4, 4)) * 1.5
    hist = np.zeros((2, N_HIST, 1, 4, 4), np.float32)
    h_eps = hist
    learned = kw.get("variance_type") == "learned_range"
    for k, t in enumerate(plan.timesteps):
        eps = rng.standard_normal(x.shape)
        out = _as(prediction_type, eps, x, s.alphas_cumprod[t])
        v = rng.uniform(-1, 1, x.shape)  # learned-variance channels pass through untouched
        z = rng.standard_normal(x.shape).astype(np.float32)
        cat = (lambda o: np.concatenate([o, v], 1)) if learned else (lambda o: o)
        x32 = x.astype(np.float32)
        want, h_eps = step_with_history(x32, cat(eps).astype(np.float32), z, eps_plan.coefs[k], h_eps)
        got, hist = step_with_history(x32, cat(out).astype(np.float32), z, plan.coefs[k], hist)
        scale = 1 + np.abs(want).max() + np.abs(out).max()  # float32 inputs of size |out| (v ~ 1/alpha_T at t = T-1)
        np.testing.assert_allclose(got, want, rtol=0, atol=SAMPLER_ATOL * scale, err_msg=f"step {k}")
        np.testing.assert_allclose(hist, h_eps, rtol=0, atol=SAMPLER_ATOL * scale, err_msg=f"step {k}")
        if not plan.uses_history:
            np.testing.assert_array_equal(step(x32, cat(out).astype(np.float32), z, plan.coefs[k]), got)
        x = want.astype(np.float64)


def test_unknown_prediction_types_are_refused():
    s = Schedule.build("linear", 100)
    with pytest.raises(UserError, match="prediction_type 'x_start'"):
        make_plan(s, "ddim", 10, prediction_type="x_start")
    # a manifest naming a type the samplers do not know was accepted and sampled as eps: silently wrong
    m = Manifest(channels=1, height=8, width=8, out_channels=1, schedule=s).to_dict()
    assert Manifest.from_dict(m, "ok.onnx").prediction_type == "epsilon"
    with pytest.raises(UserError, match="prediction_type.*'x_start'"):
        Manifest.from_dict({**m, "prediction_type": "x_start"}, "bad.onnx")
    v = Manifest.from_dict({**m, "prediction_type": "v_prediction"}, "v.onnx")
    assert v.sampling_options["prediction_type"] == "v_prediction"


def test_the_bound_is_the_same_in_every_parameterization():
    """bits/dim of one model through its eps, v and x_0 forms agree; read with the wrong type it does not."""
    s = Schedule.build("linear", 40, 1e-3, 0.2)
    w = np.random.default_rng(1).standard_normal((1, 1, 4, 4)) * 0.3
    eps_fn = lambda x, t: (np.tanh(x) * w + 0.01 * t[:, None, None, None] / 40)  # noqa: E731
    x0 = np.random.default_rng(2).uniform(-1, 1, (3, 1, 4, 4))

    def as_type(pt):
        return lambda x, t: _as(pt, eps_fn(x, t), x.astype(np.float64),
                                s.alphas_cumprod[t.astype(int)][:, None, None, None]).astype(np.float32)

    for clip in (True, False):
        want = bits_per_dim(as_type("epsilon"), x0, s, clip_sample=clip, seed=3)["bits_per_dim"]
        for pt in ("v_prediction", "sample"):
            got = bits_per_dim(as_type(pt), x0, s, clip_sample=clip, prediction_type=pt, seed=3)["bits_per_dim"]
            assert abs(got - want) <= 1e-4 * abs(want), (pt, clip, got, want)
            wrong = bits_per_dim(as_type(pt), x0, s, clip_sample=clip, seed=3)["bits_per_dim"]
            assert abs(wrong - want) > 0.02 * abs(want), (pt, clip, wrong, want)


# -- custom beta tables ------------------------------------------------------------------------------------------

def _hand_betas(T: int = TINY_T) -> np.ndarray:
    """A hand-tuned table no named schedule gives: quadratic in t from 2e-4 to 0.3."""
    return 2e-4 + (0.3 - 2e-4) * np.linspace(0, 1, T) ** 2


def test_custom_schedule_round_trips_exactly_and_is_checked():
    s = Schedule.from_betas(_hand_betas())
    m = Manifest(channels=1, height=8, width=8, out_channels=1, schedule=s)
    d = json.loads(m.to_json())
    assert d["schedule"]["beta_schedule"] == CUSTOM and len(d["schedule"]["betas"]) == TINY_T
    back = Manifest.from_dict(d, "m.onnx").schedule
    assert np.array_equal(back.betas, s.betas) and back.to_dict() == s.to_dict()
    sch = d["schedule"]
    for bad, words in [({**sch, "betas": sch["betas"][:-1]}, "entries"),
                       ({**sch, "betas": [sch["betas"][0] * 1.001] + sch["betas"][1:]}, "betas_sha256"),
                       ({**sch, "betas": [1.5] + sch["betas"][1:]}, "(0, 1)"),
                       ({**sch, "betas": "0.1,0.2"}, "list"),
                       ({k: v for k, v in sch.items() if k != "betas_sha256"}, "betas_sha256")]:
        with pytest.raises(UserError, match="schedule") as e:
            Manifest.from_dict({**d, "schedule": bad}, "m.onnx")
        assert words in str(e.value)
    with pytest.raises(ScheduleError, match="1-D"):
        Schedule.from_betas(np.full((2, 3), 0.1))


# -- a v-prediction model on a hand-tuned schedule, end to end ----------------------------------------------------

@pytest.fixture(scope="module")
def v_model(tmp_path_factory):
    """A tiny v-prediction UNet trained 6 steps by the trainer on a custom beta table (--betas FILE.npy), and its
    fp32 ONNX."""
    pytest.importorskip("torch")
    from ddpm_deploy.export import onnx_from_checkpoint
    from ddpm_deploy.train.trainer import TrainConfig, Trainer

    d = tmp_path_factory.mktemp("vpred")
    np.save(d / "betas.npy", _hand_betas())
    cfg = TrainConfig(data="digits", out=str(d / "run"), preset="tiny", image_size=8, steps=6, batch_size=8,
                      checkpoint_every=3, sample_n=0, threads=1, prediction_type="v_prediction",
                      betas=str(d / "betas.npy"))
    trainer = Trainer(cfg, progress=False)
    trainer.fit()
    onnx_path = d / "v.onnx"
    onnx_from_checkpoint(str(d / "run" / "model.pt"), onnx_path, max_batch=4, echo=lambda *_: None)
    return trainer, str(d / "run" / "model.pt"), str(onnx_path)


def test_trainer_learns_v_on_the_table_it_was_given(v_model):
    import torch

    trainer, ckpt_path, _ = v_model
    from ddpm_deploy.nn import load_checkpoint

    ckpt = load_checkpoint(ckpt_path)
    assert ckpt.prediction_type == "v_prediction" and ckpt.schedule.kind == CUSTOM
    np.testing.assert_array_equal(ckpt.schedule.betas, _hand_betas())
    from ddpm_deploy.graph.precision_audit import audit_plan

    assert audit_plan(ckpt).prediction_type == "v_prediction"  # the fp16 audit follows the model's own chain
    # the target is v = alpha_t eps - sigma_t x_0, from which alpha_t x_t - sigma_t v gives x_0 back
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(4, 1, 8, 8, generator=g), torch.randn(4, 1, 8, 8, generator=g)
    t = torch.tensor([0, 10, 30, TINY_T - 1])
    a, s = trainer.sqrt_ac[t].view(-1, 1, 1, 1), trainer.sqrt_1m_ac[t].view(-1, 1, 1, 1)
    v = trainer.target(x0, eps, t)
    torch.testing.assert_close(v, a * eps - s * x0)
    torch.testing.assert_close(a * (a * x0 + s * eps) - s * v, x0, atol=1e-6, rtol=0)


def test_v_model_exports_runs_every_sampler_and_verifies(v_model):
    """The ONNX carries v_prediction and the table; every sampler runs it with the v rows (each step of the engine's
    chain is the numpy step of make_plan(prediction_type="v_prediction") on the engine's output, and not the eps
    step) and verifies against the PyTorch reference."""
    from ddpm_deploy.app.opener import open_pipeline, open_reference
    from ddpm_deploy.app.verify import verify_chain

    _, ckpt_path, onnx_path = v_model
    m = Manifest.read(onnx_path)
    assert m.prediction_type == "v_prediction" and m.schedule.kind == CUSTOM
    np.testing.assert_array_equal(m.schedule.betas, _hand_betas())
    with open_pipeline(onnx_path, backend="onnxruntime", threads=1) as dep, open_reference(ckpt_path, threads=1) as ref:
        for sampler, steps in (("ddpm", None), ("ddim", 10), ("dpmpp", 10), ("dpmpp_sde", 10), ("unipc", 10)):
            report = verify_chain(dep, ref, sampler=sampler, steps=steps, n=2, seed=1)
            assert report["verdict"] == "pass", (sampler, report["reasons"])
        # deterministic DDIM: each step the engine's chain took is the v row's step on the engine's output
        v_plan = make_plan(m.schedule, "ddim", 10, prediction_type="v_prediction")
        eps_plan = make_plan(m.schedule, "ddim", 10)
        seen = []
        dep.sample(2, sampler="ddim", steps=10, seed=2, output="float", callback=seen.append)
        assert len(seen) == 10 and dep.plan("ddim", 10).prediction_type == "v_prediction"
        as_eps = []
        for info in seen:
            zero = np.zeros_like(info.x_t)
            np.testing.assert_allclose(info.x_prev, step(info.x_t, info.model_output, zero, v_plan.coefs[info.k]),
                                       rtol=0, atol=FUSED_MULTISTEP_ATOL, err_msg=f"step {info.k}")
            as_eps.append(np.abs(step(info.x_t, info.model_output, zero, eps_plan.coefs[info.k]) - info.x_prev).max())
        assert max(as_eps) > 0.1, as_eps  # read as eps, the steps would be others
        # eval: the bound (x_0 from v) agrees between the engine and the PyTorch reference
        from ddpm_deploy.app.evaluate import evaluate_pipelines

        ev = evaluate_pipelines([dep, ref], data="digits", split="test", n=2, seed=0, echo=lambda *_: None)
        assert ev["agreement"]["ok"] and np.isfinite(ev["results"][0]["bits_per_dim"]), ev


def test_v_model_fused_graph_takes_the_v_rows(v_model):
    """The one fused step graph, unchanged, runs v rows: DDIM (whose eps term moves into p_c) and UniPC."""
    _, _, onnx_path = v_model
    manifest, eps_sess, fused = fused_sessions(onnx_path)
    rng = np.random.default_rng(4)
    for sampler in ("ddim", "unipc", "ddpm"):
        plan = make_plan(manifest.schedule, sampler, 8, 0.5 if sampler == "ddim" else 0.0,
                         **manifest.sampling_options)
        assert_fused_walk_matches_numpy(manifest, eps_sess, fused, plan, rng, sampler)


def test_cli_runs_and_verifies_the_v_model(v_model, tmp_path):
    _, ckpt_path, onnx_path = v_model
    r = cli("run", "--engine", onnx_path, "-n", "2", "--sampler", "unipc", "--steps", "8", "--backend",
            "onnxruntime", "-o", str(tmp_path / "s.png"), "--quiet")
    assert r.returncode == 0, r.stderr
    r = cli("verify", "--backend", "onnxruntime", "--engine", onnx_path, "--checkpoint", ckpt_path, "-n", "2",
            "--sampler", "dpmpp_sde", "--steps", "8", "--report", str(tmp_path / "v.json"))
    assert r.returncode == 0, r.stdout + r.stderr
    assert json.loads((tmp_path / "v.json").read_text())["verdict"] == "pass"


def test_tampered_custom_table_in_an_onnx_is_one_line(v_model, tmp_path):
    import onnx

    _, _, onnx_path = v_model
    model = onnx.load(onnx_path)
    meta = {p.key: p for p in model.metadata_props}
    d = json.loads(meta[MANIFEST_KEY].value)
    d["schedule"]["betas"][5] *= 1.01  # an edited table no longer matches its hash: refused, not sampled
    meta[MANIFEST_KEY].value = json.dumps(d)
    onnx.save(model, tmp_path / "t.onnx")
    assert_one_line_error(cli("info", tmp_path / "t.onnx"), "betas_sha256")


# -- diffusers folders: prediction_type and trained_betas ---------------------------------------------------------

def test_diffusers_folder_with_v_and_trained_betas_round_trips(v_model, tmp_path):
    """A DDPMPipeline folder whose scheduler says prediction_type v_prediction and has trained_betas (both refused
    before) loads as the same model, and diffusers reads the folder we write the same way."""
    pytest.importorskip("diffusers")
    from diffusers import DDPMScheduler

    from ddpm_deploy.nn import load_checkpoint
    from ddpm_deploy.nn.diffusers_io import save_diffusers

    _, ckpt_path, _ = v_model
    ckpt = load_checkpoint(ckpt_path)
    folder = save_diffusers(ckpt, tmp_path / "pipe")
    sched = DDPMScheduler.from_pretrained(folder / "scheduler")
    assert sched.config.prediction_type == "v_prediction"
    np.testing.assert_allclose(sched.betas.numpy(), _hand_betas(), rtol=1e-6)
    back = load_checkpoint(str(folder))
    assert back.prediction_type == "v_prediction" and back.schedule.to_dict() == ckpt.schedule.to_dict()
    ckpt.build_unet().save_pretrained(tmp_path / "bare")  # no scheduler: export's --prediction-type says it
    assert load_checkpoint(str(tmp_path / "bare")).prediction_type == "epsilon"
    from ddpm_deploy.nn.diffusers_io import checkpoint_from_diffusers

    bare = checkpoint_from_diffusers(tmp_path / "bare", {"prediction_type": "sample", "num_train_timesteps": TINY_T})
    assert bare.prediction_type == "sample" and bare.schedule.T == TINY_T
    cfg = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps({**cfg, "prediction_type": "x0"}))
    with pytest.raises(UserError, match="prediction_type = 'x0'"):
        load_checkpoint(str(folder))
    (folder / "scheduler" / "scheduler_config.json").write_text(
        json.dumps({**cfg, "prediction_type": "sample", "trained_betas": cfg["trained_betas"][:-1] + [1.0]}))
    with pytest.raises(UserError, match=r"\(0, 1\)"):
        load_checkpoint(str(folder))


# -- train: bad --prediction-type / --betas -----------------------------------------------------------------------

def test_bad_betas_files_are_one_line(tmp_path):
    pytest.importorskip("torch")
    from ddpm_deploy.train.trainer import TrainConfig, schedule_of

    np.save(tmp_path / "obj.npy", np.array([0.1, "x"], dtype=object), allow_pickle=True)
    r = cli("train", "--betas", tmp_path / "obj.npy", "--out", tmp_path / "run", "--steps", "1", "--quiet")
    assert_one_line_error(r, "--betas", "numeric .npy")
    assert not (tmp_path / "run" / "model.pt").exists()
    cases = {"2d.npy": np.full((4, 4), 0.1), "big.npy": np.array([0.1, 1.2, 0.3]), "nan.npy": np.array([0.1, np.nan]),
             "one.npy": np.array([0.1])}
    for name, table in cases.items():
        np.save(tmp_path / name, table)
        with pytest.raises(UserError, match="--betas"):
            schedule_of(TrainConfig(betas=str(tmp_path / name)))
    with pytest.raises(UserError, match="cannot read"):
        schedule_of(TrainConfig(betas=str(tmp_path / "missing.npy")))
    (tmp_path / "text.npy").write_text("0.1 0.2")
    with pytest.raises(UserError, match="cannot read"):
        schedule_of(TrainConfig(betas=str(tmp_path / "text.npy")))


def _header_bomb(path, shape) -> None:
    """A valid 2-value float64 .npy whose header claims `shape` (a few hundred bytes on disk)."""
    import io

    buf = io.BytesIO()
    np.save(buf, np.array([0.1, 0.2]))
    header = buf.getvalue()
    path.write_bytes(header.replace(b"(2,)", repr(shape).encode().ljust(4), 1))


@pytest.mark.parametrize("shape", [(10 ** 12,), (10 ** 6, 10 ** 6), (100_001,)])
def test_a_betas_header_claiming_too_much_is_refused_before_allocating(tmp_path, shape):
    """An .npy whose header claims 10**12 values was an _ArrayMemoryError traceback (numpy sized the array from
    the header before reading); the claim is checked against MAX_TIMESTEPS first."""
    pytest.importorskip("torch")
    from ddpm_deploy.train.trainer import TrainConfig, schedule_of

    _header_bomb(tmp_path / "bomb.npy", shape)
    assert (tmp_path / "bomb.npy").stat().st_size < 200
    with pytest.raises(UserError, match="header claims") as e:
        schedule_of(TrainConfig(betas=str(tmp_path / "bomb.npy")))
    assert "\n" not in str(e.value) and "--betas" in str(e.value)


def test_a_betas_fifo_or_device_is_refused_without_blocking(tmp_path):
    """A FIFO given as --betas blocked forever (run under a timeout so a regression fails instead of hanging)."""
    import os

    os.mkfifo(tmp_path / "fifo.npy")
    r = cli("train", "--betas", tmp_path / "fifo.npy", "--out", tmp_path / "run", "--steps", "1", "--quiet",
            timeout=120)
    assert_one_line_error(r, "--betas", "not a regular file")
    os.symlink("/dev/zero", tmp_path / "zero.npy")
    r = cli("train", "--betas", tmp_path / "zero.npy", "--out", tmp_path / "run", "--steps", "1", "--quiet",
            timeout=120)
    assert_one_line_error(r, "--betas", "not a regular file")
