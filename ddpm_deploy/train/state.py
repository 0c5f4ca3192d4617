"""What a training loop (the trainer's, distill's) checkpoints to resume bit for bit besides its own counters and
settings: the raw weights, the EMA, the optimizer and the RNG; and the EMA update itself. torch is imported by the
functions that run it (importing ddpm_deploy.train stays cheap)."""

from __future__ import annotations

from pathlib import Path

from ..errors import UserError
from ..nn.checkpoint import load_raw


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


def restore_loop_state(state: dict, model, ema, opt, gen) -> None:
    """Put `loop_state`'s entries back into the loop's objects."""
    model.load_state_dict(state["raw_weights"])
    ema.load_state_dict(state["weights"])
    opt.load_state_dict(state["optimizer"])
    gen.set_state(state["rng"])


def resume_checkpoint(path: Path) -> dict:
    """The checkpoint --resume continues from (one line when there is none)."""
    if not path.exists():
        raise UserError(f"--resume: no {path} to resume from; start without --resume")
    return load_raw(path)
