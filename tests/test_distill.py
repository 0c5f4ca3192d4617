"""`ddpm-deploy distill` (progressive distillation, issue 23 part 2) on the tiny teacher (8x8 digits, T=50)."""

from __future__ import annotations

import json
from pathlib import Path

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
    from ddpm_deploy.fused_io import COL

    m = row[COL["a_x"]] * x - row[COL["a_e"]] * out
    return row[COL["p_c"]] * x + row[COL["p_0"]] * m + row[COL["c_e"]] * out


@pytest.mark.parametrize("prediction_type", ["v_prediction", "sample"])
@pytest.mark.parametrize("k", [0, 3])  # a middle step, and the last one (t'' = clean)
def test_one_student_step_lands_on_the_teachers_two(tiny_ckpt, prediction_type, k):
    """The closed-form target makes one student DDIM step (the `distilled` plan's row, read for v or x_0) land
    exactly where the teacher's two DDIM steps do, those computed with the project's numpy DDIM rows."""
    import torch

    from ddpm_deploy.nn import load_checkpoint
    from ddpm_deploy.sampling.plan import _ddim_row, make_plan
    from ddpm_deploy.sampling.step import step
    from ddpm_deploy.sampling.timesteps import timesteps
    from ddpm_deploy.train.distill import Model, ddim_step, distill_target

    ck = load_checkpoint(tiny_ckpt)
    sched, unet = ck.schedule, ck.build_unet()
    grid = timesteps(sched.T, TEACHER_STEPS, "trailing")
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
    from ddpm_deploy.artifact.manifest import Manifest
    from ddpm_deploy.nn import load_checkpoint
    from ddpm_deploy.sampling.timesteps import timesteps

    ckpt_path, onnx_path = student
    ck = load_checkpoint(ckpt_path)
    grid = timesteps(ck.schedule.T, TEACHER_STEPS, "trailing")[::4].tolist()
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
    from ddpm_deploy.app.opener import open_pipeline, open_reference

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
    from ddpm_deploy.sampling.spec import DEFAULT_SAMPLER
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


# -- knobs that make NaN models, divergence ------------------------------------------------------------------------

KNOBS = [(dict(lr=float("inf")), "--lr"), (dict(lr=float("nan")), "--lr"), (dict(lr=-1e-3), "--lr"),
         (dict(ema_decay=float("nan")), "--ema-decay"), (dict(ema_decay=5.0), "--ema-decay"),
         (dict(ema_decay=1.0), "--ema-decay"), (dict(grad_clip=float("nan")), "grad_clip"),
         (dict(checkpoint_every=0), "--checkpoint-every")]


@pytest.mark.parametrize("knob,word", KNOBS, ids=[f"{k}={v}" for (d, _) in KNOBS for k, v in d.items()])
def test_knobs_out_of_range_are_refused_before_any_work(tiny_ckpt, tmp_path, knob, word):
    """--lr inf and --ema-decay nan wrote all-NaN students (exit 0), --ema-decay 5 was taken, --lr nan was torch's
    ValueError traceback (the CLI refuses them at parse time: test_cli_errors.py)."""
    from ddpm_deploy.errors import UserError

    with pytest.raises(UserError, match=word):
        _distiller(tiny_ckpt, tmp_path / "out", **knob)
    assert not (tmp_path / "out").exists()


def test_divergence_stops_before_anything_is_saved(tiny_ckpt, tmp_path):
    """A finite but absurd lr (1e30) diverges within two updates: the run stops naming the update, and the last good
    checkpoint is neither overwritten nor followed by a NaN student (it wrote one, card "loss nan", exit 0)."""
    from ddpm_deploy.errors import UserError

    _distiller(tiny_ckpt, tmp_path).run(stop_after=4)  # a good checkpoint at update 3
    good = (tmp_path / "checkpoint.pt").read_bytes()
    resumed = _distiller(tiny_ckpt, tmp_path, resume=True, lr=1e30)
    with pytest.raises(UserError, match=r"diverged at round 1 update [45]: the (loss|gradient norm) is nan"):
        resumed.run()
    assert (tmp_path / "checkpoint.pt").read_bytes() == good
    assert not (tmp_path / "4step").exists()


# -- resume files --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def killed_run(tiny_ckpt, tmp_path_factory):
    """A run killed inside round 1: OUT/checkpoint.pt at update 3."""
    out = tmp_path_factory.mktemp("killed")
    _distiller(tiny_ckpt, out).run(stop_after=4)
    return out


def _zeros_like_first(key):
    def edit(s):
        name = next(iter(s[key]))
        s[key][name] = s[key][name].new_zeros(3)
    return edit


def _set(key, value):
    def edit(s):
        s[key] = value
    return edit


def _edit_adam(s):
    first = next(iter(s["optimizer"]["state"].values()))
    first["exp_avg"] = first["exp_avg"].new_zeros(2)


def _edit_beta(s):
    s["optimizer"]["param_groups"][0]["betas"] = (0.5, 0.999)


TAMPERED = [  # (edit of the saved state, words of the one line)
    (lambda s: s["grid"].__setitem__(0, 50), "field grid"),           # an entry >= T (was: IndexError after a write)
    (lambda s: s["grid"].reverse(), "field grid"),                    # ascending (was: exit 0, a student info refuses)
    (lambda s: s["grid"].__setitem__(-1, -5), "field grid"),          # negative (was: torch's indexing wrapped)
    (lambda s: s["grid"].pop(), "field grid"),                        # odd length (was: a wrong grid)
    (_set("round", -1), "field round"),
    (_set("round", 99), "field round"),
    (lambda s: s.update(round=1, update=0), "field grid"),           # in range, but not the round its grid is for
    (_set("update", -3), "field update"),
    (_set("update", 2.5), "field update"),
    (_set("teacher_clip", float("nan")), "teacher_clip"),
    (_set("teacher_prediction_type", "sample"), "teacher_prediction_type"),
    (lambda s: s.pop("optimizer"), "no field 'optimizer'"),
    (lambda s: s.pop("grid"), "field grid"),
    (lambda s: s.pop("config"), "field config"),
    (_zeros_like_first("raw_weights"), "raw_weights["),
    (_zeros_like_first("teacher_weights"), "teacher_weights["),
    (lambda s: next(iter(s["weights"].values())).fill_(float("nan")), "holds inf/NaN"),
    (_set("rng", __import__("torch").zeros(10, dtype=__import__("torch").uint8)), "field rng"),
    (_set("rng", "seed"), "field rng"),
    (_edit_adam, "field optimizer state"),
    (_edit_beta, "betas"),
    (_set("losses", [0.1]), "field losses"),
    (_set("cards_json", "[" * 5000), "field cards_json"),
    (_set("round_wall", float("nan")), "field round_wall"),
]


@pytest.mark.parametrize("edit,words", TAMPERED, ids=[w + f"-{i}" for i, (_, w) in enumerate(TAMPERED)])
def test_resume_checks_every_field(killed_run, tiny_ckpt, tmp_path, edit, words):
    """distill --resume trusted the file's grid and counters (wrong students, tracebacks): derivable fields are
    derived and compared, the rest range-checked, every problem one line; nothing is written."""
    import shutil

    import torch

    from ddpm_deploy.errors import UserError

    out = tmp_path / "run"
    shutil.copytree(killed_run, out)
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    edit(state)
    torch.save(state, out / "checkpoint.pt")
    before = sorted(p.name for p in out.rglob("*"))
    with pytest.raises(UserError) as e:
        _distiller(tiny_ckpt, out, resume=True)
    assert words in str(e.value) and "\n" not in str(e.value), str(e.value)
    assert sorted(p.name for p in out.rglob("*")) == before


# -- output folders ------------------------------------------------------------------------------------------------

def test_distill_never_replaces_a_train_runs_checkpoint(tiny_ckpt, tmp_path):
    """distill --out over a `train` folder replaced its checkpoint.pt (train --resume then died: KeyError 'unet');
    the reverse, train over a distill folder, and a second run over a folder without --resume, likewise."""
    import shutil

    from ddpm_deploy.errors import UserError
    from ddpm_deploy.train.trainer import TrainConfig, Trainer

    train_dir = tmp_path / "train"  # a copy of the tiny teacher's training folder: checkpoint.pt + model.pt
    shutil.copytree(Path(tiny_ckpt).parent, train_dir)
    tiny_ckpt = str(train_dir / "model.pt")
    before = (train_dir / "checkpoint.pt").read_bytes()
    for resume in (False, True):
        with pytest.raises(UserError, match="`ddpm-deploy train` run"):
            _distiller(tiny_ckpt, train_dir, resume=resume)
    assert (train_dir / "checkpoint.pt").read_bytes() == before and not (train_dir / "4step").exists()

    run = tmp_path / "distill"
    _distiller(tiny_ckpt, run).run(stop_after=4)
    before = (run / "checkpoint.pt").read_bytes()
    with pytest.raises(UserError, match="already holds a `ddpm-deploy distill` run.*--resume"):
        _distiller(tiny_ckpt, run)
    cfg = dict(data="digits", out=str(run), preset="tiny", image_size=8, num_train_timesteps=50, steps=2,
               batch_size=4, sample_n=0, threads=1)
    for resume in (False, True):
        with pytest.raises(UserError, match="`ddpm-deploy distill` run"):
            Trainer(TrainConfig(**cfg), resume=resume, progress=False)
    assert (run / "checkpoint.pt").read_bytes() == before and not (run / "model.pt").exists()


# -- diffusers teachers ---------------------------------------------------------------------------------------------

def test_a_diffusers_teachers_identity_covers_its_schedule(tiny_ckpt, tmp_path):
    """A diffusers-folder teacher was identified by its weights alone: an edited scheduler_config.json let
    distill --resume mix two schedules."""
    from ddpm_deploy.errors import UserError
    from ddpm_deploy.nn import load_checkpoint
    from ddpm_deploy.nn.diffusers_io import save_diffusers

    folder = save_diffusers(load_checkpoint(tiny_ckpt), tmp_path / "teacher")
    _distiller(str(folder), tmp_path / "run").run(stop_after=4)
    sha = load_checkpoint(folder).identity_sha256
    weights_sha = load_checkpoint(folder).sha256  # what manifests record as the source: the weights file's
    sched = folder / "scheduler" / "scheduler_config.json"
    text = sched.read_text()
    cfg = json.loads(text)
    sched.write_text(json.dumps({**cfg, "beta_end": cfg["beta_end"] * 2}))
    assert load_checkpoint(folder).identity_sha256 != sha and load_checkpoint(folder).sha256 == weights_sha
    with pytest.raises(UserError, match="distills another teacher"):
        _distiller(str(folder), tmp_path / "run", resume=True)
    sched.write_text(text)  # the same files again: the same teacher
    assert load_checkpoint(folder).identity_sha256 == sha
    config = folder / "unet" / "config.json"
    config.write_text(config.read_text() + "\n")
    assert load_checkpoint(folder).identity_sha256 != sha


def test_distill_cli_with_an_absurd_finite_lr_is_one_line(tiny_ckpt, tmp_path):
    """`distill --lr 1e30` wrote an all-NaN student and exited 0."""
    r = cli("distill", tiny_ckpt, "--out", tmp_path / "d", "--teacher-steps", "8", "--steps-to", "4",
            "--updates-per-round", "4", "--batch-size", "4", "--lr", "1e30", "--threads", "1", "--quiet")
    assert_one_line_error(r, "diverged at round 1 update", "lower --lr")
    assert not (tmp_path / "d" / "4step").exists() and not (tmp_path / "d" / "checkpoint.pt").exists()
