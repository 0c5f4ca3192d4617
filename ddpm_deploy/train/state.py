"""What a training loop (the trainer's, distill's) checkpoints to resume bit for bit besides its own counters and
settings: the raw weights, the EMA, the optimizer and the RNG; and the EMA update itself. torch is imported by the
functions that run it (importing ddpm_deploy.train stays cheap).

A resume file is input like any other: every entry is checked against the loop's own objects (names, shapes, dtypes,
finiteness, the optimizer's hyperparameters and step count, the RNG state's size) before anything is loaded, so a
damaged or tampered file is one line, never a traceback or a silently different run. The loops also refuse to go
on, or to save, once a loss, gradient or weight is not finite (`check_finite_update`, `nonfinite_tensor`)."""

from __future__ import annotations

import math
from pathlib import Path

from ..errors import UserError, first_line
from ..nn.checkpoint import load_raw

CHECKPOINT_NAME = "checkpoint.pt"  # OUT/checkpoint.pt: a train or distill run's resume state (its "kind" says which)
RESUME_KINDS = {"train": "`ddpm-deploy train`", "distill": "`ddpm-deploy distill`",
                "consistency": "`ddpm-deploy distill --method consistency`"}


def ema_update(ema, model, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model, parameter by parameter."""
    import torch

    with torch.no_grad():
        for e, p in zip(ema.parameters(), model.parameters()):
            e.lerp_(p, 1.0 - decay)


def loop_state(model, ema, opt, gen) -> dict:
    """The checkpoint entries of a loop's learning state: raw weights, EMA ('weights': what sampling loads),
    optimizer, RNG."""
    return {"raw_weights": model.state_dict(), "weights": ema.state_dict(), "optimizer": opt.state_dict(),
            "rng": gen.get_state()}


def restore_loop_state(state: dict, model, ema, opt, gen, steps_taken: int, path: Path) -> None:
    """Put `loop_state`'s entries back into the loop's objects, each checked first; `steps_taken` is the optimizer
    steps the loop's own counter says were taken (Adam records its own: they must agree)."""
    check_weights(state, "raw_weights", model, path)
    check_weights(state, "weights", ema, path)
    check_optimizer(state, opt, steps_taken, path)
    rng = _field(state, "rng", path)
    want = gen.get_state()
    if not _is_tensor(rng) or rng.dtype != want.dtype or rng.shape != want.shape:
        raise UserError(f"{path}: field rng is not a torch CPU generator state ({_describe(rng)}); the file is "
                        "damaged: resume from a good copy or start again")
    try:  # everything was checked above; a library refusal left over is still one line
        model.load_state_dict(state["raw_weights"])
        ema.load_state_dict(state["weights"])
        opt.load_state_dict(state["optimizer"])
        gen.set_state(rng)
    except (RuntimeError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path}: the learning state cannot be restored ({type(e).__name__}: "
                        f"{first_line(e, 100)}); the file is damaged: resume from a good copy or start again") from None


def resume_state(path: Path, kind: str) -> dict:
    """The checkpoint --resume continues from, which must be `kind`'s (one line when there is none or it is
    another command's)."""
    if not path.exists():
        raise UserError(f"--resume: no {path} to resume from; start without --resume")
    state = load_raw(path)
    found = state_kind(state)
    if found != kind:
        what = (f"a {RESUME_KINDS[found]} run's resume state" if found else
                "a sampling checkpoint without training state" if "raw_weights" not in state else
                "not a resume checkpoint")
        raise UserError(f"{path} is {what}, not a {RESUME_KINDS[kind]} one: point --out at the folder of the "
                        f"{kind} run to continue")
    return state


def check_same_run(state: dict, path: Path, teacher: str, teacher_sha256: str, cfg, keys, verb: str) -> None:
    """A distill run's resume file continues this run: the same teacher (by its identity hash) and the same flags
    for `keys` (they define the run's randomness and what each update computes)."""
    if state.get("teacher_sha256") != teacher_sha256:
        raise UserError(f"{path} {verb} another teacher than {teacher}: give the same TEACHER")
    saved = state.get("config")
    if not isinstance(saved, dict):
        raise UserError(f"{path} has no settings (field config); the file is damaged: start again")
    for k in keys:
        if saved.get(k) != getattr(cfg, k):
            raise UserError(f"{path} was started with {k}={str(repr(saved.get(k)))[:60]}, not "
                            f"{getattr(cfg, k)!r}: use the same flags to resume")


def state_kind(state: dict) -> str | None:
    """'train', 'distill' or None. A trainer checkpoint may lack 'kind': it holds 'train' settings and
    'raw_weights'."""
    kind = state.get("kind")
    if isinstance(kind, str) and kind in RESUME_KINDS:
        return kind
    if kind is None and isinstance(state.get("train"), dict) and "raw_weights" in state:
        return "train"
    return None


def claim_out(out: Path, kind: str, resume: bool) -> None:
    """An output folder holding a resume state is only continued, never overwritten: without --resume, or with
    another command's state there, refuse before any work (train and distill both keep OUT/checkpoint.pt: one
    would replace the other's)."""
    path = out / CHECKPOINT_NAME
    if resume or not path.exists():
        return
    try:
        found = state_kind(load_raw(path))
    except UserError:
        found = None
    if found == kind:
        raise UserError(f"{out} already holds a {RESUME_KINDS[kind]} run ({path}): pass --resume to continue it, "
                        "or choose another --out (a new run never overwrites one)")
    what = f"a {RESUME_KINDS[found]} run" if found else "a file this command did not write"
    raise UserError(f"{out} holds {what} ({path}): choose another --out for `ddpm-deploy {kind}`")


# -- checks on resume entries ----------------------------------------------------------------------

def _is_tensor(x) -> bool:
    import torch

    return isinstance(x, torch.Tensor)


def _describe(x) -> str:
    if _is_tensor(x):
        return f"a {x.dtype} tensor of shape {tuple(x.shape)}"
    return f"a {type(x).__name__}"


def _field(state: dict, key: str, path: Path):
    if key not in state:
        raise UserError(f"{path} has no field {key!r}; the file is damaged: resume from a good copy or start again")
    return state[key]


def _all_finite(t) -> bool:
    import torch

    return not t.is_floating_point() or bool(torch.isfinite(t).all())


def check_weights(state: dict, key: str, module, path: Path) -> None:
    """state[key] is `module`'s state dict in kind: the same names, shapes and dtypes, every value finite."""
    saved = _field(state, key, path)
    want = module.state_dict()
    if not isinstance(saved, dict) or set(saved) != set(want):
        extra = sorted(set(saved) - set(want)) if isinstance(saved, dict) else []
        missing = sorted(set(want) - set(saved)) if isinstance(saved, dict) else []
        raise UserError(f"{path}: field {key} does not hold this model's weights (missing {missing[:2]}, unknown "
                        f"{extra[:2]}); resume with the same model flags, or start again")
    for name, w in want.items():
        v = saved[name]
        if not _is_tensor(v) or v.shape != w.shape or v.dtype != w.dtype:
            raise UserError(f"{path}: {key}[{name!r}] is {_describe(v)}, the model has a {w.dtype} tensor of shape "
                            f"{tuple(w.shape)}; the file is damaged or of another model")
        if not _all_finite(v):
            raise UserError(f"{path}: {key}[{name!r}] holds inf/NaN; the run it saved had diverged or the file is "
                            "damaged: resume from an earlier copy or start again")


def _same(a, b) -> bool:
    norm = lambda v: list(v) if isinstance(v, (tuple, list)) else v  # noqa: E731 - torch.load gives lists or tuples
    return norm(a) == norm(b)


def check_optimizer(state: dict, opt, steps_taken: int, path: Path) -> None:
    """The saved AdamW state is this optimizer's: the same parameter groups and hyperparameters (lr is set every
    step, so it may differ), per-parameter moments of the parameters' shapes, finite, and a step count equal to
    the loop's (a moment tensor of another shape only failed at the next update, an edited beta was used silently)."""
    saved = _field(state, "optimizer", path)
    fresh = opt.state_dict()
    def bad(what: str) -> UserError:
        return UserError(f"{path}: field optimizer {what}; the file is damaged or of another run: resume from a good "
                         "copy or start again")

    if (not isinstance(saved, dict) or not isinstance(saved.get("state"), dict)
            or not isinstance(saved.get("param_groups"), list)
            or len(saved["param_groups"]) != len(fresh["param_groups"])):
        raise bad("is not an AdamW state of this model")
    for g_saved, g_fresh in zip(saved["param_groups"], fresh["param_groups"]):
        if not isinstance(g_saved, dict) or not _same(g_saved.get("params"), g_fresh["params"]):
            raise bad("has other parameter groups than this model")
        for k, v in g_fresh.items():
            if k not in ("params", "lr") and k in g_saved and not _same(g_saved[k], v):
                raise bad(f"has {k} = {str(g_saved[k])[:40]}, this run uses {v}")
    params = [p for g in opt.param_groups for p in g["params"]]
    for i, entry in saved["state"].items():
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < len(params) or not isinstance(entry, dict):
            raise bad(f"has a state entry {str(i)[:20]} for no parameter")
        for name, v in entry.items():
            if not _is_tensor(v) or not _all_finite(v):
                raise bad(f"state {i}.{name} is {_describe(v)} or not finite")
            if name == "step":
                if v.numel() != 1 or float(v) != steps_taken:
                    raise bad(f"has taken {float(v) if v.numel() == 1 else '?'} steps, the checkpoint's counter "
                              f"says {steps_taken}")
            elif v.shape != params[i].shape:
                raise bad(f"state {i}.{name} has shape {tuple(v.shape)}, its parameter {tuple(params[i].shape)}")
            elif name == "exp_avg_sq" and bool((v < 0).any()):
                raise bad(f"state {i}.{name} has negative entries (a second moment)")


def checked_int(value, key: str, lo: int, hi: int, path: Path, fix: str = "") -> int:
    """An integer field of a resume file within lo..hi (both included)."""
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise UserError(f"{path}: field {key} = {str(value)[:40]} must be an integer in {lo}..{hi}"
                        f"{fix or '; the file is damaged: resume from a good copy or start again'}")
    return value


def checked_float_list(value, key: str, n: int, path: Path) -> list[float]:
    """A list of n finite floats (a resume file's loss log, load log)."""
    if (not isinstance(value, list) or len(value) != n
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)):
        raise UserError(f"{path}: field {key} must be {n} finite numbers (one per logged update), got "
                        f"{_describe(value)}{f' of {len(value)}' if isinstance(value, list) else ''}; the file is "
                        "damaged: resume from a good copy or start again")
    return [float(v) for v in value]


# -- learning knobs --------------------------------------------------------------------------------

def check_knobs(lr: float, ema_decay: float, grad_clip: float, warmup: int, checkpoint_every: int) -> None:
    """Ranges shared by train and distill. lr only needs to be finite and > 0 here: one too large to train with
    is caught by the loops' finiteness checks, at the step where it diverges."""
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise UserError(f"--lr must be a finite number > 0, got {lr}")
    if not (isinstance(ema_decay, (int, float)) and 0.0 <= ema_decay < 1.0):  # NaN fails both comparisons
        raise UserError(f"--ema-decay must be in [0, 1) (0: no averaging; 1 would never move the EMA weights off "
                        f"the initial ones), got {ema_decay}")
    if not (isinstance(grad_clip, (int, float)) and math.isfinite(grad_clip) and grad_clip > 0):
        raise UserError(f"grad_clip must be a finite number > 0, got {grad_clip}")
    for name, v, lo in (("warmup", warmup, 0), ("--checkpoint-every", checkpoint_every, 1)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise UserError(f"{name} must be an integer >= {lo}, got {v}")


# -- divergence ------------------------------------------------------------------------------------

def nonfinite_tensor(*modules) -> str | None:
    """The name of the first parameter or buffer with an inf/NaN among `modules`' state dicts, else None."""
    for m in modules:
        for name, v in m.state_dict().items():
            if not _all_finite(v):
                return name
    return None


def check_finite_update(where: str, what: str, value: float, lr: float) -> None:
    """Refuse to go on from a non-finite loss or gradient norm at `where` ("step 7", "round 1 update 7"): nothing
    from there on is saved, so OUT keeps its last good checkpoint."""
    if not math.isfinite(value):
        raise UserError(f"training diverged at {where}: the {what} is {value} (peak --lr {lr:g}); nothing from "
                        "there on was saved: lower --lr (--resume continues the last checkpoint with the new one)")
