"""`ddpm-deploy distill --method consistency` (Easy Consistency Tuning) on the tiny teacher (8x8 digits, T=50): the
EDM sigma <-> timestep mapping, the start is the teacher exactly, the loss falls, resume is exact, the student is an
ordinary checkpoint that records sampler lcm and its grid, exports, verifies and samples with lcm by default."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import assert_one_line_error, cli

torch = pytest.importorskip("torch")


def _tuner(tiny_ckpt, out, resume=False, **kw):
    from ddpm_deploy.train.consistency import ConsistencyConfig, ConsistencyTuner

    cfg = dict(teacher=tiny_ckpt, out=str(out), steps=2, updates=6, stage_updates=4, batch_size=8, lr=1e-3,
               ema_decay=0.9, checkpoint_every=3, threads=1)
    cfg.update(kw)
    return ConsistencyTuner(ConsistencyConfig(**cfg), resume=resume, progress=False, echo=lambda *_: None)


def test_sigma_mapping_and_gap(tiny_ckpt, tmp_path):
    """sigma_t = sqrt((1 - a-bar)/a-bar) makes x_t = sqrt(a-bar) (x_0 + sigma eps) the DDPM forward process; drawn
    sigmas land on the nearest timestep in log sigma, r below t (or clean), and the gap shrinks with the stage."""
    d = _tuner(tiny_ckpt, tmp_path)
    ac = d.schedule.alphas_cumprod
    s = np.sqrt((1 - ac) / ac)
    np.testing.assert_allclose(d.sigmas.numpy(), s, rtol=1e-12)
    np.testing.assert_allclose(np.sqrt(ac) * (1 + s * 0.7), np.sqrt(ac) + np.sqrt(1 - ac) * 0.7, rtol=1e-12)
    probe = torch.tensor([s[0] / 10, s[3] * 1.01, s[20], s[-1] * 10], dtype=torch.float64)
    assert d.timestep_of(probe).tolist() == [0, 3, 20, len(s) - 1]
    from ddpm_deploy.train.consistency import gap_end

    gaps, cleans = [], []
    for stage in (0, 2, 5):
        x_t, t, x_r, r, x0, w = d.draw_batch(torch.Generator().manual_seed(0), 512, stage)
        assert torch.all(r < t) and torch.all(r >= -1) and torch.all(r[t == 0] == -1)
        cleans.append(int((r < 0).sum()))
        sigma_t = d.sigmas[t]
        sigma_r = torch.where(r >= 0, d.sigmas[r.clamp(min=0)], torch.zeros(len(r), dtype=torch.float64))
        assert torch.all(sigma_r <= gap_end(sigma_t, stage, 2.0, 8.0, 1.0) + 1e-12)  # the gap is at least r(t)'s
        torch.testing.assert_close(w, (1 / (sigma_t - sigma_r)).float())
        gaps.append(float(((sigma_t - sigma_r) / sigma_t).median()))
        keep = r >= 0  # shared eps: x_r = alpha_r x_0 + sigma_r eps with the eps of x_t
        col = lambda v, i: v[i[keep]].view(-1, 1, 1, 1)  # noqa: E731
        eps = (x_t[keep].double() - col(d.alpha, t) * x0[keep].double()) / col(d.sigma_vp, t)
        torch.testing.assert_close(x_r[keep].double(), col(d.alpha, r) * x0[keep].double() + col(d.sigma_vp, r) * eps,
                                   atol=1e-4, rtol=0)
    assert gaps[0] > gaps[1] > gaps[2] and cleans[0] > cleans[1] > cleans[2], (gaps, cleans)


def test_the_start_is_the_teacher_exactly(tiny_ckpt, tmp_path):
    """Before any update the consistency function is the teacher's x_0-prediction, bit for bit."""
    from ddpm_deploy.nn import load_checkpoint

    d = _tuner(tiny_ckpt, tmp_path)
    ck = load_checkpoint(tiny_ckpt)
    x = torch.randn(3, 1, 8, 8)
    t = torch.tensor([49, 20, 0])
    with torch.no_grad():
        eps = ck.build_unet()(x, t).sample
        a, s = d.alpha[t].float().view(-1, 1, 1, 1), d.sigma_vp[t].float().view(-1, 1, 1, 1)
        assert torch.equal(d.x0_hat(d.student, x, t), (x - s * eps) / a)


def test_a_short_run_lowers_the_loss(tiny_ckpt, tmp_path):
    """On a fixed held-out draw (one stage throughout), the EMA student's consistency loss after 60 updates is below
    the teacher's (measured 8.16 -> 6.8, a steady fall)."""
    d = _tuner(tiny_ckpt, tmp_path, updates=60, stage_updates=1000, batch_size=16, lr=3e-3, ema_decay=0.8)
    before = d.eval_loss(d.student, n=128)
    card = d.run()
    after = d.eval_loss(n=128)
    assert after < 0.9 * before, (before, after)
    assert json.loads((tmp_path / "card.json").read_text()) == card
    assert card["updates"] == 60 and card["sampler"] == "lcm" and card["eval_loss_end"] < card["eval_loss_start"]
    assert (tmp_path / "card.md").read_text().startswith("# Consistency-tuned student")


def _weights(path, key="weights"):
    return torch.load(path, weights_only=True)[key]


@pytest.mark.parametrize("stop_after", [4, 5])  # killed after the checkpoint at update 3 (stage 0); stage changes at 4
def test_resume_is_exact(tiny_ckpt, tmp_path, stop_after):
    _tuner(tiny_ckpt, tmp_path / "whole").run()
    killed = _tuner(tiny_ckpt, tmp_path / "killed")
    assert killed.run(stop_after=stop_after) is None
    assert not (tmp_path / "killed" / "model.pt").exists()
    resumed = _tuner(tiny_ckpt, tmp_path / "killed", resume=True)
    assert resumed.update == 3
    resumed.run()
    for key in ("weights", "raw_weights"):
        a = _weights(tmp_path / "whole" / "checkpoint.pt", key)
        b = _weights(tmp_path / "killed" / "checkpoint.pt", key)
        assert all(torch.equal(a[n], b[n]) for n in a)
    a, b = _weights(tmp_path / "whole" / "model.pt"), _weights(tmp_path / "killed" / "model.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


def test_resume_refuses_other_flags_and_writes_the_student_early(tiny_ckpt, tmp_path):
    from ddpm_deploy.errors import UserError

    _tuner(tiny_ckpt, tmp_path).run(stop_after=3)
    with pytest.raises(UserError, match="batch_size"):
        _tuner(tiny_ckpt, tmp_path, batch_size=4, resume=True)
    early = _tuner(tiny_ckpt, tmp_path, updates=2, resume=True)  # stopped at 3: the student as it is there
    assert early.run()["updates"] == 3 and (tmp_path / "model.pt").exists()


@pytest.fixture(scope="module")
def student(tiny_ckpt, tmp_path_factory):
    """A short consistency run through the CLI, and its fp32 ONNX."""
    from ddpm_deploy.export import onnx_from_checkpoint

    out = tmp_path_factory.mktemp("ect")
    r = cli("distill", tiny_ckpt, "--method", "consistency", "--out", out, "--steps-to", "2", "--updates", 5,
            "--stage-updates", 2, "--batch-size", 8, "--checkpoint-every", 2, "--threads", 1, "--quiet")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "wrote" in r.stdout and (out / "card.json").exists()
    onnx_path = out / "student.onnx"
    onnx_from_checkpoint(str(out / "model.pt"), onnx_path, max_batch=4, echo=lambda *_: None)
    return out / "model.pt", onnx_path


def test_student_records_lcm_and_its_grid(student, tiny_ckpt):
    from ddpm_deploy.artifact.manifest import Manifest
    from ddpm_deploy.nn import load_checkpoint
    from ddpm_deploy.sampling.plan import lcm_timesteps

    ckpt_path, onnx_path = student
    ck, teacher = load_checkpoint(ckpt_path), load_checkpoint(tiny_ckpt)
    want = {"steps": 2, "timesteps": lcm_timesteps(ck.schedule.T, 2).tolist(), "sampler": "lcm"}
    assert ck.distilled == want and Manifest.read(onnx_path).distilled == want
    assert ck.prediction_type == teacher.prediction_type and ck.clip_sample == teacher.clip_sample


def test_student_exports_verifies_and_samples_with_lcm_by_default(student, tmp_path):
    ckpt_path, onnx_path = student
    r = cli("verify", "--engine", onnx_path, "--checkpoint", ckpt_path, "--backend", "onnxruntime", "-n", 2,
            "--report", tmp_path / "v.json", "--quiet")
    assert r.returncode == 0, r.stdout + r.stderr
    report = json.loads((tmp_path / "v.json").read_text())
    assert report["verdict"] == "pass" and report["sampler"] == "lcm" and report["steps"] == 2
    r = cli("run", "--engine", onnx_path, "--backend", "onnxruntime", "-n", 2, "-o", tmp_path / "a.png", "--quiet")
    assert r.returncode == 0 and "lcm 2 steps" in r.stdout and "warning" not in r.stderr, r.stdout + r.stderr
    r = cli("run", "--engine", onnx_path, "--backend", "onnxruntime", "-n", 2, "--sampler", "lcm", "--steps", 1,
            "-o", tmp_path / "b.png", "--quiet")
    assert r.returncode == 0 and "lcm 1 steps" in r.stdout and "warning" not in r.stderr, r.stdout + r.stderr
    r = cli("run", "--engine", onnx_path, "--backend", "onnxruntime", "-n", 2, "--sampler", "ddim", "--steps", 3,
            "-o", tmp_path / "c.png", "--quiet")
    assert r.returncode == 0 and "consistency-tuned for --sampler lcm" in r.stderr, r.stdout + r.stderr


def test_python_api_and_server_default_to_lcm(student):
    from ddpm_deploy.app.opener import open_pipeline, open_reference
    from ddpm_deploy.serve.service import ServeConfig, Service

    ckpt_path, onnx_path = student
    with open_pipeline(str(onnx_path), "cpu", "onnxruntime", None, 1) as dep, open_reference(str(ckpt_path)) as ref:
        assert dep.plan().sampler == ref.plan().sampler == "lcm"
        np.testing.assert_array_equal(dep.plan().timesteps, ref.plan().timesteps)
        a, b = dep.sample(2, seed=3, output="float"), ref.sample(2, seed=3, output="float")
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-3)
    service = Service(ServeConfig(engine=str(onnx_path), backend="onnxruntime", threads=1))
    try:
        req = service.parse({"n": 1})
        assert req.spec.sampler == "lcm"
        assert service.plan_for(req.spec).timesteps.tolist() == service.manifest.distilled["timesteps"]
    finally:
        service.close()


@pytest.mark.parametrize("field,value,msg", [
    ("update", -3, "update"), ("update", "3", "update"), ("losses", [float("nan")] * 3, "losses"),
    ("losses", [0.1], "losses"), ("wall", float("inf"), "wall"), ("rng", torch.zeros(3), "rng"),
    ("kind", "distill", "distill"), ("config", None, "config"),
])
def test_resume_checks_the_checkpoint(tiny_ckpt, tmp_path, field, value, msg):
    """The same trust as train/distill --resume: a tampered counter, log, RNG state or kind is one line, not a
    traceback or a wrong student."""
    from ddpm_deploy.errors import UserError
    from ddpm_deploy.nn.checkpoint import load_raw, save_atomic

    _tuner(tiny_ckpt, tmp_path).run(stop_after=3)
    path = tmp_path / "checkpoint.pt"
    state = load_raw(path)
    state[field] = value
    save_atomic(state, path)
    with pytest.raises(UserError, match=msg):
        _tuner(tiny_ckpt, tmp_path, resume=True).run()
    assert not (tmp_path / "model.pt").exists()


def test_divergence_stops_before_anything_is_saved(tiny_ckpt, tmp_path):
    from ddpm_deploy.errors import UserError

    with pytest.raises(UserError, match="diverged at update"):
        _tuner(tiny_ckpt, tmp_path, lr=1e30).run()
    assert not (tmp_path / "model.pt").exists()


def test_a_new_run_never_replaces_another_runs_checkpoint(tiny_ckpt, tmp_path):
    from ddpm_deploy.errors import UserError

    _tuner(tiny_ckpt, tmp_path).run(stop_after=3)
    before = (tmp_path / "checkpoint.pt").read_bytes()
    with pytest.raises(UserError, match="--resume"):
        _tuner(tiny_ckpt, tmp_path)
    assert (tmp_path / "checkpoint.pt").read_bytes() == before


def test_consistency_cli_bad_input_is_one_line(tiny_ckpt, tmp_path):
    r = cli("distill", tiny_ckpt, "--method", "consistency", "--out", tmp_path / "d", "--teacher-steps", "8")
    assert_one_line_error(r, "--teacher-steps", "progressive")
    r = cli("distill", tiny_ckpt, "--out", tmp_path / "d", "--updates", "10")
    assert_one_line_error(r, "--updates", "consistency")
    r = cli("distill", tiny_ckpt, "--method", "consistency", "--out", tmp_path / "d", "--updates", "0")
    assert_one_line_error(r, "--updates")
    r = cli("distill", tiny_ckpt, "--method", "consistency", "--out", tmp_path / "d", "--resume")
    assert_one_line_error(r, "--resume")


def test_progress_lines_off_a_terminal(tiny_ckpt, tmp_path):
    """Into a log (nohup): progress lines on stderr with the loss; --quiet: none."""
    args = ("distill", tiny_ckpt, "--method", "consistency", "--out", tmp_path / "a", "--updates", 3,
            "--batch-size", 4, "--threads", 1)
    r = cli(*args)
    assert r.returncode == 0, r.stderr
    lines = [l for l in r.stderr.splitlines() if l.startswith("consistency: ")]
    assert lines and "3/3 upds" in r.stderr and lines[-1].startswith("consistency: done"), r.stderr
    r = cli(*args[:5], tmp_path / "b", *args[6:], "--quiet")
    assert r.returncode == 0 and "consistency: " not in r.stderr, r.stderr
