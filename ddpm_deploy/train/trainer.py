"""The training loop: L_simple = ||eps - eps_theta(x_t, t)||^2 (Ho et al. Algorithm 1), EMA, atomic checkpoints,
exact resume (step, optimizer, EMA, RNG state). The network may instead predict v = alpha_t eps - sigma_t x_0
(Salimans & Ho 2022) or x_0 itself (`prediction_type`); the schedule may be any beta table (`betas`, a .npy)."""
# torch (the torch extra) is imported where it runs: importing this module needs no torch.

from __future__ import annotations

import copy
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..config import PREDICTION_TYPES, unet_config
from ..errors import UserError
from ..export import onnx_from_checkpoint
from ..files import check_writable_dir, read_npy
from ..nn.checkpoint import FORMAT, FORMAT_VERSION, load_raw, save_atomic
from ..nn.unet import unet_from_config
from ..progress import Progress
from ..runtime import load
from ..sampling.schedule import MAX_TIMESTEPS, Schedule, ScheduleError
from .data import load_dataset
from .state import (CHECKPOINT_NAME, check_finite_update, check_knobs, checked_int, claim_out, ema_update, loop_state,
                    nonfinite_tensor, restore_loop_state, resume_state)

# How the end-of-training grid is drawn: the fast path (temporary fp32 ONNX on onnxruntime) with a short sampler.
# One place to switch to a faster sampler (e.g. {"sampler": "dpmsolver++", "steps": 20}) once it exists.
GRID_SAMPLING = {"sampler": "ddim", "steps": 50}
GRID_MAX_BATCH = 16  # throughput of the small UNets on CPU is flat beyond batch 16; larger grids are chunked
# The loss train shows (progress and summary alike) is an EMA of the batch losses over ~1/(1 - decay) = 100 batches:
# one batch's loss swings with its draws of t. It is saved with the checkpoint, so --resume continues it.
LOSS_EMA_DECAY = 0.99


@dataclass
class TrainConfig:
    data: str = "digits"
    out: str = "runs/digits"
    preset: str = "small"
    image_size: int | None = None
    beta_schedule: str = "linear"
    num_train_timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    variance_type: str = "fixed_small"
    clip_sample: bool = True
    prediction_type: str = "epsilon"      # what the network learns to output: epsilon, v_prediction or sample
    betas: str | None = None              # a .npy beta table (float, 1-D): replaces beta_schedule/T/start/end
    steps: int = 8000
    batch_size: int = 64
    lr: float = 5e-4
    warmup_steps: int = 200
    ema_decay: float = 0.995
    grad_clip: float = 1.0
    checkpoint_every: int = 500
    seed: int = 0
    sample_n: int = 64
    threads: int | None = None

    def check(self) -> None:
        """The learning knobs' ranges (inf/NaN are out of every range): a NaN model is refused before any work."""
        check_knobs(lr=self.lr, ema_decay=self.ema_decay, grad_clip=self.grad_clip, warmup=self.warmup_steps,
                    checkpoint_every=self.checkpoint_every)


def schedule_of(cfg: TrainConfig) -> Schedule:
    """The named schedule, or the table in cfg.betas (a .npy read without pickles); bad ones are a UserError."""
    if cfg.betas is None:
        try:
            return Schedule.build(cfg.beta_schedule, cfg.num_train_timesteps, cfg.beta_start, cfg.beta_end)
        except ScheduleError as e:
            raise UserError(f"bad schedule: {e}") from None
    try:  # a regular file whose header claims at most MAX_TIMESTEPS values: nothing sized from it before
        betas = read_npy(cfg.betas, MAX_TIMESTEPS)
    except OSError as e:  # missing, a FIFO or a device, too large
        raise UserError(f"--betas {cfg.betas}: cannot read a numeric .npy table ({e.strerror or type(e).__name__}); "
                        "save one with numpy.save") from None
    except ValueError as e:  # not .npy, an .npz, an object array (needs pickle), a header claiming too much
        raise UserError(f"--betas {cfg.betas}: cannot read a numeric .npy table ({e}); save one 1-D table with "
                        "numpy.save") from None
    try:
        return Schedule.from_betas(betas)
    except ScheduleError as e:
        raise UserError(f"--betas {cfg.betas}: {e}") from None


class Trainer:
    def __init__(self, cfg: TrainConfig, resume: bool = False, progress: bool = True):
        import torch

        cfg.check()
        if cfg.variance_type != "fixed_small" and cfg.variance_type != "fixed_large":
            raise UserError(f"training supports variance_type fixed_small or fixed_large (L_simple has no "
                            f"variance term), got {cfg.variance_type!r}")
        if cfg.prediction_type not in PREDICTION_TYPES:
            raise UserError(f"unknown prediction_type {cfg.prediction_type!r}: choose one of "
                            f"{', '.join(PREDICTION_TYPES)}")
        self.schedule = schedule_of(cfg)  # before the data: a bad table is refused first
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.cfg, self.progress = cfg, progress
        self.out = check_writable_dir(cfg.out)  # refused now, not after the training run
        claim_out(self.out, "train", resume)
        self.x0 = torch.from_numpy(load_dataset(cfg.data, cfg.image_size, split="train"))
        n, c, h, _ = self.x0.shape
        # The trainer uses the numpy float64 tables, cast once at the edge.
        self.sqrt_ac = torch.from_numpy(np.sqrt(self.schedule.alphas_cumprod)).float()
        self.sqrt_1m_ac = torch.from_numpy(np.sqrt(1.0 - self.schedule.alphas_cumprod)).float()
        self.unet_cfg = unet_config(cfg.preset, sample_size=h, channels=c)
        torch.manual_seed(cfg.seed)
        self.model = unet_from_config(self.unet_cfg).train()
        self.ema = copy.deepcopy(self.model).eval().requires_grad_(False)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, weight_decay=0.0)
        self.gen = torch.Generator().manual_seed(cfg.seed)  # all training randomness comes from here
        self.step = 0
        self.loss_ema = None  # no batch yet (see LOSS_EMA_DECAY)
        if resume:
            self._resume()
            self.loss_ema = saved_loss_ema(load_raw(self.out / "checkpoint.pt"))

    # -- checkpoints -------------------------------------------------------------------------------
    def _state(self, full: bool) -> dict:
        state = {"format": FORMAT, "format_version": FORMAT_VERSION, "unet": self.unet_cfg,
                 "schedule": self.schedule.to_dict(), "variance_type": self.cfg.variance_type,
                 "clip_sample": self.cfg.clip_sample, "clip_sample_range": 1.0,
                 "prediction_type": self.cfg.prediction_type,
                 "weights": self.ema.state_dict(),
                 "train": {**asdict(self.cfg), "step": self.step, "loss_ema": self.loss_ema}}
        if full:
            state.update(loop_state(self.model, self.ema, self.opt, self.gen), step=self.step, kind="train")
        return state

    def _resume(self) -> None:
        path = self.out / CHECKPOINT_NAME
        state = resume_state(path, "train")
        if state.get("unet") != self.unet_cfg or state.get("schedule") != self.schedule.to_dict():
            raise UserError(f"{path} was trained with another model/schedule; use the same flags to resume")
        if state.get("prediction_type", "epsilon") != self.cfg.prediction_type:
            raise UserError(f"{path} was trained with --prediction-type {state.get('prediction_type', 'epsilon')}; "
                            "use the same flags to resume")
        step = state.get("step")
        if isinstance(step, int) and not isinstance(step, bool) and step >= self.cfg.steps:
            raise UserError(f"{path} is already at step {step} and --steps {self.cfg.steps} is the "
                            f"total, not steps to add: pass --steps greater than {step} to train on")
        self.step = checked_int(step, "step", 0, self.cfg.steps - 1, path)
        restore_loop_state(state, self.model, self.ema, self.opt, self.gen, self.step, path)

    def _check_saveable(self) -> None:
        """Nothing non-finite is written: the weights (raw and EMA) and the EMA model's output on a few training
        images (finite weights can still be large enough to overflow a forward pass)."""
        import torch

        name = nonfinite_tensor(self.model, self.ema)
        if name is None:
            x0 = self.x0[:4]
            t = torch.full((len(x0),), self.schedule.T // 2)
            with torch.inference_mode():
                out = self.ema(self.sqrt_ac[t].view(-1, 1, 1, 1) * x0, t).sample
            if bool(torch.isfinite(out).all()):
                return
            name = "the EMA model's output"
        raise UserError(f"training diverged by step {self.step}: {name} is not finite (peak --lr {self.cfg.lr:g}); "
                        "nothing from this step on was saved: lower --lr")

    def save_checkpoint(self) -> None:
        self._check_saveable()
        save_atomic(self._state(full=True), self.out / CHECKPOINT_NAME)

    def save_model(self) -> Path:
        self._check_saveable()
        path = self.out / "model.pt"
        save_atomic(self._state(full=False), path)
        return path

    # -- the loop ----------------------------------------------------------------------------------
    def target(self, x0, eps, t):
        """What the network learns to output at (x_t, t): eps, v = alpha_t eps - sigma_t x_0, or x_0."""
        if self.cfg.prediction_type == "epsilon":
            return eps
        if self.cfg.prediction_type == "sample":
            return x0
        return self.sqrt_ac[t].view(-1, 1, 1, 1) * eps - self.sqrt_1m_ac[t].view(-1, 1, 1, 1) * x0

    def loss_step(self):
        """Algorithm 1: x_0 ~ data, t ~ U{0..T-1}, eps ~ N(0, I), gradient step on ||target - f_theta(x_t, t)||^2
        (the unweighted simple loss for every prediction type; target eps, v or x_0, see `target`)."""
        import torch

        cfg = self.cfg
        idx = torch.randint(0, len(self.x0), (cfg.batch_size,), generator=self.gen)
        t = torch.randint(0, self.schedule.T, (cfg.batch_size,), generator=self.gen)
        eps = torch.randn((cfg.batch_size, *self.x0.shape[1:]), generator=self.gen)
        x0 = self.x0[idx]
        x_t = self.sqrt_ac[t].view(-1, 1, 1, 1) * x0 + self.sqrt_1m_ac[t].view(-1, 1, 1, 1) * eps  # eq. 4
        loss = torch.nn.functional.mse_loss(self.model(x_t, t).sample, self.target(x0, eps, t))
        check_finite_update(f"step {self.step + 1}", "loss", loss.item(), cfg.lr)
        for g in self.opt.param_groups:
            g["lr"] = cfg.lr * min(1.0, (self.step + 1) / max(1, cfg.warmup_steps))
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        check_finite_update(f"step {self.step + 1}", "gradient norm", float(norm), cfg.lr)
        self.opt.step()
        ema_update(self.ema, self.model, cfg.ema_decay)
        self.step += 1  # weights an update made non-finite: the next loss, or the check before any save
        return loss.item()

    def fit(self) -> dict:
        """Train to cfg.steps; returns the model path, steps, seconds, `loss_ema` (the figure the progress shows,
        see LOSS_EMA_DECAY) and `last_batch_loss`."""
        self.out.mkdir(parents=True, exist_ok=True)
        cfg, last, t0 = self.cfg, float("nan"), time.time()
        # a bar on a terminal, else a line every 10 % / 30 s on stderr (CI logs, nohup); `progress` False: nothing
        bar = Progress("train", cfg.steps, initial=self.step, unit="step", enabled=self.progress, leave=True)
        while self.step < cfg.steps:
            last = self.loss_step()
            self.loss_ema = last if self.loss_ema is None else (LOSS_EMA_DECAY * self.loss_ema
                                                                 + (1 - LOSS_EMA_DECAY) * last)
            if self.step % 10 == 0 or self.step == cfg.steps:  # before update: the last line shows the final figure
                bar.set_postfix(**{"loss EMA": f"{self.loss_ema:.4f}"})
            bar.update(1)
            if self.step % cfg.checkpoint_every == 0 or self.step == cfg.steps:
                self.save_checkpoint()
        bar.close()
        model_path = self.save_model()
        return {"model": str(model_path), "steps": self.step, "seconds": time.time() - t0,
                "loss_ema": float("nan") if self.loss_ema is None else self.loss_ema, "last_batch_loss": last}


def saved_loss_ema(state: dict) -> float | None:
    """The loss EMA a checkpoint was saved with (None: written before it carried one, or not a finite number)."""
    train = state.get("train")
    value = train.get("loss_ema") if isinstance(train, dict) else None
    if isinstance(value, (int, float)) and not isinstance(value, bool) and np.isfinite(value):
        return float(value)
    return None


def sample_grid(trainer: Trainer, n: int, seed: int = 0, progress: bool = False) -> tuple[np.ndarray, str]:
    """n samples of the saved EMA model drawn the way it will be deployed: export OUT/model.pt to a temporary
    fp32 ONNX (parity-checked) and sample it on onnxruntime with GRID_SAMPLING. Returns uint8 (N, H, W, C) images
    and a description of how they were drawn."""
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "model.onnx"
        onnx_from_checkpoint(str(trainer.out / "model.pt"), path, max_batch=min(n, GRID_MAX_BATCH),
                             echo=lambda *_: None, progress=progress)
        with load(str(path), backend="onnxruntime") as pipe:
            steps = min(GRID_SAMPLING["steps"], pipe.schedule.T)
            images = pipe.sample(n, seed=seed, **{**GRID_SAMPLING, "steps": steps}, progress=progress)
            name = pipe.backend.name
    return images, f"{GRID_SAMPLING['sampler']} {steps} steps on {name}"
