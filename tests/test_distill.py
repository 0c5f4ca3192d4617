"""`ddpm-deploy distill` (progressive distillation, issue 23 part 2) on the tiny teacher (8x8 digits, T=50)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import assert_one_line_error, cli

TEACHER_STEPS = 8


def _distiller(tiny_ckpt, out, resume=False, **kw):
    from ddpm_deploy.train.distill import DistillConfig, Distiller

    cfg = dict(teacher=tiny_ckpt, out=str(out), teacher_steps=TEACHER_STEPS, steps_to=4, updates_per_round=[6],
               batch_size=8, lr=1e-3, warmup=2, ema_decay=0.9, checkpoint_every=3, threads=1)
    cfg.update(kw)
    return Distiller(DistillConfig(**cfg), resume=resume, progress=False, echo=lambda *_: None)


def _affine_step64(x, out, row):
    """The plan's documented step (samplers module docstring) in float64, no clip hit, no noise: an independent
    reading of the plan rows."""
    from ddpm_deploy.samplers import COL

    m = row[COL["a_x"]] * x - row[COL["a_e"]] * out
    return row[COL["p_c"]] * x + row[COL["p_0"]] * m + row[COL["c_e"]] * out


@pytest.mark.parametrize("prediction_type", ["v_prediction", "sample"])
@pytest.mark.parametrize("k", [0, 3])  # a middle step, and the last one (t'' = clean)
def test_one_student_step_lands_on_the_teachers_two(tiny_ckpt, prediction_type, k):
    """The closed-form target makes one student DDIM step (the `distilled` plan's row, read for v or x_0) land
    exactly where the teacher's two DDIM steps do, those computed with the project's numpy DDIM rows."""
    import torch

    from ddpm_deploy.nn import load_checkpoint
    from ddpm_deploy.samplers import _ddim_row, make_plan, step
    from ddpm_deploy.train.distill import Model, ddim_step, distill_target, trailing_timesteps

    ck = load_checkpoint(tiny_ckpt)
    sched, unet = ck.schedule, ck.build_unet()
    grid = trailing_timesteps(sched.T, TEACHER_STEPS)
    t, t1 = int(grid[2 * k]), int(grid[2 * k + 1])
    t2 = int(grid[2 * k + 2]) if 2 * k + 2 < len(grid) else -1
    ac = sched.alphas_cumprod
    al = lambda s: 1.0 if s < 0 else float(np.sqrt(ac[s]))  # noqa: E731
    sg = lambda s: 0.0 if s < 0 else float(np.sqrt(1 - ac[s]))  # noqa: E731
    z_t = np.random.default_rng(k).standard_normal((3, 1, 8, 8)).astype(np.float32)

    def eps_net(x, s):
        with torch.no_grad():
            return unet(torch.from_numpy(x), torch.full((len(x),), s)).sample.numpy()

    # independent: the project's DDIM rows (diffusers' DDIMScheduler, clipped x_0) on the eps teacher, in float32
    z1 = step(z_t, eps_net(z_t, t), np.zeros_like(z_t), np.asarray(_ddim_row(sched, t, t1, 0.0, "", 1.0)))
    z2 = step(z1, eps_net(z1, t1), np.zeros_like(z1), np.asarray(_ddim_row(sched, t1, t2, 0.0, "", 1.0)))

    # the distiller's teacher steps (float64 algebra) agree with them
    teacher = Model(unet.requires_grad_(False), "epsilon", 1.0)
    zt64 = torch.from_numpy(z_t).double()
    x0, eps = teacher.x0_and_eps(zt64, torch.full((3,), t), al(t), sg(t))
    z1_d = ddim_step(x0, eps, al(t1), sg(t1))
    x0, eps = teacher.x0_and_eps(z1_d, torch.full((3,), t1), al(t1), sg(t1))
    z2_d = ddim_step(x0, eps, al(t2), sg(t2))
    np.testing.assert_allclose(z2_d.numpy(), z2, rtol=0, atol=2e-5)

    # the target, as the student's output, and one step of the student's own plan from z_t
    x_tilde = distill_target(zt64, z2_d, al(t), sg(t), al(t2), sg(t2)).numpy()
    if t2 < 0:
        np.testing.assert_allclose(x_tilde, x0.numpy(), rtol=0, atol=1e-12)  # last step: the teacher's x_0
    out = (al(t) * z_t.astype(np.float64) - x_tilde) / sg(t) if prediction_type == "v_prediction" else x_tilde
    timesteps = [t] if t2 < 0 else [t, t2]
    plan = make_plan(sched, "distilled", distilled_timesteps=timesteps, clip_sample=False,
                     prediction_type=prediction_type)
    landed = _affine_step64(z_t.astype(np.float64), out, plan.coefs[0])
    np.testing.assert_allclose(landed, z2_d.numpy(), rtol=0, atol=1e-9)
    # and the float32 step every backend runs
    landed32 = step(z_t, out.astype(np.float32), np.zeros_like(z_t), plan.coefs[0])
    np.testing.assert_allclose(landed32, z2_d.numpy(), rtol=0, atol=1e-4)


def test_a_short_round_lowers_the_two_step_loss(tiny_ckpt, tmp_path):
    d = _distiller(tiny_ckpt, tmp_path, updates_per_round=[40], batch_size=16, ema_decay=0.8)
    before = d.eval_loss(d.student, n=128)
    cards = d.run()
    after = d.eval_loss(d.teacher.unet, n=128)  # the round's EMA student is now the next teacher
    assert after < 0.5 * before, (before, after)
    card = json.loads((tmp_path / "4step" / "card.json").read_text())
    assert card == cards[0] and card["updates"] == 40 and card["steps"] == 4
    assert card["eval_loss_end"] < card["eval_loss_start"]
    assert (tmp_path / "4step" / "card.md").read_text().startswith("# 4-step student")


def _weights(path):
    import torch

    return torch.load(path, weights_only=True)["weights"]


# killed inside round 1 (last checkpoint at update 3); inside round 2 (the one written when round 1 ended)
@pytest.mark.parametrize("stop_after,resumes_at", [(4, (0, 3)), (8, (1, 0))])
def test_resume_is_exact(tiny_ckpt, tmp_path, stop_after, resumes_at):
    import torch

    whole = _distiller(tiny_ckpt, tmp_path / "whole", steps_to=2)
    whole.run()
    killed = _distiller(tiny_ckpt, tmp_path / "killed", steps_to=2)
    killed.run(stop_after=stop_after)  # the process dies: only OUT/checkpoint.pt (every 3 updates) survives
    assert not (tmp_path / "killed" / "2step").exists()
    resumed = _distiller(tiny_ckpt, tmp_path / "killed", steps_to=2, resume=True)
    assert (resumed.round, resumed.update) == resumes_at
    resumed.run()
    for k in ("4step", "2step"):
        a, b = _weights(tmp_path / "whole" / k / "model.pt"), _weights(tmp_path / "killed" / k / "model.pt")
        assert a.keys() == b.keys()
        for name in a:
            assert torch.equal(a[name], b[name]), (k, name)


def test_resume_refuses_other_flags(tiny_ckpt, tmp_path):
    from ddpm_deploy.errors import UserError

    _distiller(tiny_ckpt, tmp_path).run(stop_after=3)
    with pytest.raises(UserError, match="batch_size"):
        _distiller(tiny_ckpt, tmp_path, batch_size=4, resume=True)


@pytest.fixture(scope="module")
def student(tiny_ckpt, tmp_path_factory):
    """A 2-step student (two short rounds) and its fp32 ONNX."""
    from ddpm_deploy.export import onnx_from_checkpoint

    out = tmp_path_factory.mktemp("distill")
    _distiller(tiny_ckpt, out, steps_to=2, updates_per_round=[5]).run()
    onnx_path = out / "student.onnx"
    onnx_from_checkpoint(str(out / "2step" / "model.pt"), onnx_path, max_batch=4, echo=lambda *_: None)
    return out / "2step" / "model.pt", onnx_path


def test_student_is_an_ordinary_checkpoint_that_records_its_grid(student):
    from ddpm_deploy.manifest import Manifest
    from ddpm_deploy.nn import load_checkpoint
    from ddpm_deploy.train.distill import trailing_timesteps

    ckpt_path, onnx_path = student
    ck = load_checkpoint(ckpt_path)
    grid = trailing_timesteps(ck.schedule.T, TEACHER_STEPS)[::4].tolist()
    assert ck.prediction_type == "v_prediction" and ck.distilled == {"steps": 2, "timesteps": grid}
    assert Manifest.read(onnx_path).distilled == {"steps": 2, "timesteps": grid}


def test_student_exports_runs_and_verifies_on_its_grid_by_default(student, tmp_path):
    ckpt_path, onnx_path = student
    r = cli("verify", "--engine", onnx_path, "--checkpoint", ckpt_path, "--backend", "onnxruntime", "-n", 2,
            "--report", tmp_path / "v.json", "--quiet")
    assert r.returncode == 0, r.stdout + r.stderr
    report = json.loads((tmp_path / "v.json").read_text())
    assert report["verdict"] == "pass" and report["sampler"] == "distilled" and report["steps"] == 2
    r = cli("run", "--engine", onnx_path, "--backend", "onnxruntime", "-n", 2, "-o", tmp_path / "a.png", "--quiet")
    assert r.returncode == 0 and "distilled 2 steps" in r.stdout and "warning" not in r.stderr, r.stdout + r.stderr
    r = cli("run", "--engine", onnx_path, "--backend", "onnxruntime", "-n", 2, "--sampler", "ddim", "--steps", 3,
            "-o", tmp_path / "b.png", "--quiet")
    assert r.returncode == 0 and "ddim 3 steps" in r.stdout, r.stdout + r.stderr
    assert r.stderr.strip().splitlines() == [l for l in r.stderr.strip().splitlines() if l.startswith("warning: ")]
    assert "distilled for 2-step DDIM" in r.stderr


def test_student_default_plan_matches_torch_reference_on_the_grid(student):
    """The Python API: the ONNX pipeline and the PyTorch reference both default to the distilled grid."""
    from ddpm_deploy.pipelines import open_pipeline, open_reference

    ckpt_path, onnx_path = student
    with open_pipeline(str(onnx_path), "cpu", "onnxruntime", None, 1) as dep, open_reference(str(ckpt_path)) as ref:
        assert dep.plan().sampler == ref.plan().sampler == "distilled"
        np.testing.assert_array_equal(dep.plan().timesteps, ref.plan().timesteps)
        a, b = dep.sample(2, seed=3, output="float"), ref.sample(2, seed=3, output="float")
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-3)


def test_distilled_sampler_on_an_ordinary_model_is_one_line(tiny_onnx, tmp_path):
    r = cli("run", "--engine", tiny_onnx, "--backend", "onnxruntime", "-n", 1, "--sampler", "distilled",
            "-o", tmp_path / "x.png")
    assert_one_line_error(r, "ddpm-deploy distill")


def test_distill_cli_bad_input_is_one_line(tiny_ckpt, tmp_path):
    r = cli("distill", tiny_ckpt, "--out", tmp_path / "d", "--teacher-steps", "4", "--steps-to", "4")
    assert_one_line_error(r, "--teacher-steps")
    r = cli("distill", tiny_ckpt, "--out", tmp_path / "d", "--updates-per-round", "10,x")
    assert_one_line_error(r, "--updates-per-round")
    r = cli("distill", tiny_ckpt, "--out", tmp_path / "d", "--teacher-steps", "8", "--resume")
    assert_one_line_error(r, "--resume")


def test_server_defaults_to_the_students_grid(student, tiny_onnx):
    """POST /generate without a sampler: the student's grid; an ordinary model keeps the CLI default."""
    from ddpm_deploy.samplers import DEFAULT_SAMPLER
    from ddpm_deploy.serve.service import ServeConfig, Service

    for engine, want in ((student[1], "distilled"), (tiny_onnx, DEFAULT_SAMPLER)):
        service = Service(ServeConfig(engine=str(engine), backend="onnxruntime", threads=1))
        try:
            req = service.parse({"n": 1})
            assert req.spec.sampler == want
            if want == "distilled":
                assert service.plan_for(req.spec).timesteps.tolist() == service.manifest.distilled["timesteps"]
        finally:
            service.close()


def test_shipped_student_runs_by_name(tmp_path):
    """`ddpm-deploy run --checkpoint digits-4step` (a shipped name: the PyTorch reference) samples its own grid
    (`--engine digits-4step` is refused with one line pointing here: tests/test_cli_errors.py)."""
    r = cli("run", "--checkpoint", "digits-4step", "-n", 2, "-o", tmp_path / "s.png", "--quiet")
    assert r.returncode == 0 and "distilled 4 steps" in r.stdout, r.stdout + r.stderr
