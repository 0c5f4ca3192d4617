"""Consistency multistep sampling, `--sampler lcm`, as plan rows, against diffusers' LCMScheduler:

- its grid (set_timesteps with original_inference_steps) at every step count, on T = 1000 and the tiny T = 50;
- teacher-forced single steps on random x and model outputs, every prediction type, with and without the x_0
  clip, several step counts, the same z;
- whole stochastic chains on the tiny UNet with the same x_T and step noise, on the PyTorch reference and
  onnxruntime, and the fused step graph against the numpy step along an lcm chain;
- the spec's refusals and the CLI.
"""

from __future__ import annotations

import numpy as np
import pytest

from conftest import assert_fused_walk_matches_numpy, assert_one_line_error, cli, fused_sessions

from ddpm_deploy.errors import UserError
from ddpm_deploy.sampling.spec import SamplerSpec
from ddpm_deploy.sampling.plan import lcm_timesteps, make_plan
from ddpm_deploy.sampling.step import step
from ddpm_deploy.sampling.schedule import Schedule
from ddpm_deploy.tolerances import LCM_CHAIN_X0_MAX_ABS, LCM_STEP_RTOL

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def lcm_scheduler(schedule, prediction_type="epsilon", clip_sample=False):
    from diffusers import LCMScheduler

    return LCMScheduler(num_train_timesteps=schedule.T, trained_betas=np.asarray(schedule.betas),
                        prediction_type=prediction_type, clip_sample=clip_sample)


@pytest.mark.parametrize("T", [1000, 50])
def test_grid_matches_diffusers_set_timesteps(T):
    sched = lcm_scheduler(Schedule.build("linear", T))
    for steps in range(1, 51):
        sched.set_timesteps(steps)
        np.testing.assert_array_equal(lcm_timesteps(T, steps), sched.timesteps.numpy(), err_msg=f"K={steps}")
        plan = make_plan(Schedule.build("linear", T), "lcm", steps)
        np.testing.assert_array_equal(plan.timesteps, sched.timesteps.numpy())
    assert lcm_timesteps(1000, 4).tolist() == [999, 759, 499, 259]
    assert make_plan(Schedule.build("linear", T), "lcm").steps == 4  # the default, LCM's usual 4 steps


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("T", [1000, 50])
def test_teacher_forced_steps_match_diffusers(prediction_type, T):
    """Every step of diffusers' own chain: its x_t and a random model output into our row, one step out, with the
    noise diffusers draws (read from a copy of its generator), K = 1, 2, 4, 7 and with / without the x_0 clip."""
    schedule = Schedule.build("linear", T)
    g = torch.Generator().manual_seed(0)
    for clip in (False, True):
        for K in (1, 2, 4, 7):
            plan = make_plan(schedule, "lcm", K, clip_sample=clip, prediction_type=prediction_type)
            sched = lcm_scheduler(schedule, prediction_type, clip)
            sched.set_timesteps(K)
            assert plan.stochastic == (K > 1)
            x = torch.randn(2, 1, 8, 8, generator=g) * 1.5
            for k, t in enumerate(sched.timesteps):
                out = torch.randn(x.shape, generator=g)
                z = torch.randn(x.shape, generator=torch.Generator().set_state(g.get_state()))
                prev = sched.step(out, t, x, generator=g).prev_sample
                ours = step(x.numpy(), out.numpy(), z.numpy(), plan.coefs[k])
                where = f"clip={clip} K={K} step {k} t={int(t)}"
                atol = LCM_STEP_RTOL * (1 + float(prev.abs().max()))
                np.testing.assert_allclose(ours, prev.numpy(), rtol=0, atol=atol, err_msg=where)
                x = prev


def test_one_step_is_the_x0_prediction_and_the_last_step_adds_no_noise():
    s = Schedule.build("linear", 1000)
    plan = make_plan(s, "lcm", 1, clip_sample=False)
    x = np.random.default_rng(0).standard_normal((1, 1, 4, 4)).astype(np.float32)
    eps = np.random.default_rng(1).standard_normal(x.shape).astype(np.float32)
    z = np.full_like(x, 100.0)
    ac = s.alphas_cumprod[999]
    np.testing.assert_allclose(step(x, eps, z, plan.coefs[0]), (x - np.sqrt(1 - ac) * eps) / np.sqrt(ac),
                               rtol=1e-5, atol=1e-5)
    four = make_plan(s, "lcm", 4)
    assert four.coefs[-1][3] == 0.0 and np.all(four.coefs[:-1, 3] > 0)  # s_min: noise on all steps but the last


@pytest.fixture(scope="module")
def tiny(tiny_ckpt, tiny_onnx):
    from ddpm_deploy.nn import load_checkpoint
    from ddpm_deploy.app.opener import open_pipeline

    ckpt = load_checkpoint(tiny_ckpt)
    with open_pipeline(tiny_ckpt, backend="torch", threads=1) as ref, open_pipeline(
            tiny_onnx, backend="onnxruntime", threads=1) as ort:
        yield ckpt, ckpt.build_unet().eval(), (ref, ort)


@pytest.mark.parametrize("steps", [1, 2, 4, 8])
def test_whole_stochastic_chain_matches_diffusers(tiny, monkeypatch, steps):
    """From the same x_T and per-step noise (diffusers' randn_tensor made to return it), diffusers' LCMScheduler
    driving the tiny UNet and our chain on the PyTorch reference and onnxruntime end at the same x_0."""
    import diffusers.schedulers.scheduling_lcm as lcm_module

    from ddpm_deploy.sampling.noise import request_noise

    ckpt, unet, pipes = tiny
    n = 3
    x_T, z = request_noise(11, n, (1, 8, 8), steps)
    sched = lcm_scheduler(ckpt.schedule, ckpt.prediction_type, ckpt.clip_sample)
    sched.set_timesteps(steps)
    drawn = iter(range(1, steps))  # diffusers draws noise on every step but the last: step k re-noises with z[k]
    monkeypatch.setattr(lcm_module, "randn_tensor", lambda shape, **kw: torch.from_numpy(z[next(drawn) - 1]))
    x = torch.from_numpy(x_T)
    for t in sched.timesteps:
        with torch.no_grad():
            x = sched.step(unet(x, t).sample, t, x).prev_sample
    want = x.numpy()
    assert np.isfinite(want).all()
    for pipe in pipes:
        got = pipe.sample(n, x_T=x_T, step_noise=z, output="float", sampler="lcm", steps=steps)
        err = float(np.abs(got - want).max())
        assert err <= LCM_CHAIN_X0_MAX_ABS, (pipe.backend.name, err)
    if steps > 1:  # other step noise, other images: the noise is really used (one step takes none)
        other = pipes[1].sample(n, x_T=x_T, step_noise=-z, output="float", sampler="lcm", steps=steps)
        assert float(np.abs(other - want).max()) > 100 * LCM_CHAIN_X0_MAX_ABS


def test_fused_graph_matches_numpy_step(tiny_onnx):
    from ddpm_deploy.sampling.plan import model_plan

    manifest, eps_sess, fused = fused_sessions(tiny_onnx)
    for steps in (1, 4):
        plan = model_plan(manifest, SamplerSpec("lcm", steps))
        assert_fused_walk_matches_numpy(manifest, eps_sess, fused, plan, np.random.default_rng(steps), f"lcm {steps}")


@pytest.mark.parametrize("fields,words", [
    ({"sampler": "lcm", "spacing": "trailing"}, ("lcm", "drop spacing")),
    ({"sampler": "lcm", "eta": 0.5}, ("eta applies to sampler ddim",)),
    ({"sampler": "lcm", "order": 2}, ("lcm has no order",)),
])
def test_spec_refuses_options_lcm_has_not(fields, words):
    with pytest.raises(UserError) as e:
        SamplerSpec(**fields)
    assert all(w in str(e.value) for w in words), str(e.value)


def test_too_many_steps_is_refused_with_the_limit():
    with pytest.raises(UserError, match="at most 50 steps"):
        make_plan(Schedule.build("linear", 1000), "lcm", 51)


def test_cli_runs_lcm_and_refuses_bad_options(tiny_onnx, tmp_path):
    out = tmp_path / "lcm.png"
    r = cli("run", "--engine", tiny_onnx, "--sampler", "lcm", "--steps", "2", "-n", "2", "-o", str(out))
    assert r.returncode == 0, r.stderr
    assert out.exists()
    assert_one_line_error(cli("run", "--engine", tiny_onnx, "--sampler", "lcm", "--steps", "60", "-n", "1", "-o",
                              str(tmp_path / "x.png")), "at most", "lcm")
