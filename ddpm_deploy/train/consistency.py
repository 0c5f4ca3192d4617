"""Easy Consistency Tuning (Geng et al. 2024, "Consistency Models Made Easy"; DESIGN.md §3f) of a DDPM teacher: the
student starts as the teacher and learns to map every point of a noising path to the same x_0, so that sampler
`lcm` (x_0, then fresh noise to the next timestep) can take 1-4 steps.

The consistency function is the network's x_0-prediction f(x_t, t) = x0_hat (from eps, v or x_0, the teacher's
prediction type). In EDM's variables (x = x_t / alpha_t, x = x_0 + sigma * eps) an eps-network is D(x, sigma) =
x - sigma * eps_hat: EDM's preconditioning with the boundary f = x at sigma = 0, so the initial consistency model
*is* the teacher, exactly.

EDM sigma <-> the teacher's discrete timesteps: sigma_t = sqrt((1 - a-bar_t) / a-bar_t), increasing in t, and
x_t = sqrt(a-bar_t) * (x_0 + sigma_t * eps) is the DDPM forward process with the same eps. A drawn sigma ~
LogNormal(P_mean, P_std) goes to the timestep t whose sigma_t is nearest in log sigma (clamped to [0, T-1]); the
gap's other end r(sigma_t) = sigma_t * (1 - q^-(stage+1) * (1 + k * sigmoid(-b * sigma_t))) goes to the largest
timestep whose sigma is <= r (so the gap is never smaller than the curriculum asks) and below t; none ("clean",
sigma 0) when r is below sigma_0, where the target is x_0 itself.

Loss per image: pseudo-Huber sqrt(||f(x_t) - f(x_r)||^2 + c^2) - c over all pixels, weighted by 1 / (sigma_t -
sigma_r); f(x_r) is the same network under no_grad (ECT's "self-teacher"), shared eps for x_t and x_r. RAdam, EMA
(only what is written and evaluated). The stage advances every `stage_updates` updates, shrinking the gap.

OUT/checkpoint.pt holds everything to resume bit for bit; OUT/model.pt (+ card.json, card.md) is the EMA student,
an ordinary checkpoint whose `distilled` record names sampler lcm and its grid, so every entry point samples it
with lcm by default.
"""
# torch is imported where it runs: importing this module needs none.

from __future__ import annotations

import copy
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..errors import UserError
from ..files import check_writable_dir, write_text_atomic
from ..nn import load_checkpoint
from ..nn.checkpoint import FORMAT, FORMAT_VERSION, save_atomic
from ..sampling.plan import lcm_timesteps
from .data import load_dataset
from .state import (CHECKPOINT_NAME, check_finite_update, check_knobs, check_same_run, checked_float_list, checked_int,
                    claim_out, ema_update, loop_state, nonfinite_tensor, restore_loop_state, resume_state)

MODEL_NAME = "model.pt"


@dataclass
class ConsistencyConfig:
    teacher: str = "digits"
    out: str = "runs/ect"
    steps: int = 4                  # the lcm steps the student records as its default
    updates: int = 2000             # total optimizer updates (with resume: the total to reach)
    stage_updates: int = 500        # updates per curriculum stage (the gap shrinks by q each stage)
    batch_size: int = 64
    lr: float = 1e-4
    ema_decay: float = 0.995
    p_mean: float = -1.1            # t ~ LogNormal(P_mean, P_std) (ECT / EDM)
    p_std: float = 2.0
    q: float = 2.0                  # ECT's gap curriculum: r = t (1 - q^-(stage+1) (1 + k sigmoid(-b t)))
    k: float = 8.0
    b: float = 1.0
    huber_c: float | None = None    # None: 0.00054 * sqrt(pixels) (Song & Dhariwal 2023, iCT)
    data: str = "digits"
    checkpoint_every: int = 100
    seed: int = 0
    threads: int | None = None

    def check(self) -> None:
        if not 1 <= self.steps <= 50:
            raise UserError(f"--steps-to for --method consistency must be between 1 and 50 (lcm's grid), got "
                            f"{self.steps}")
        if self.updates < 1 or self.stage_updates < 1:
            raise UserError(f"--updates and --stage-updates must be positive, got {self.updates}, "
                            f"{self.stage_updates}")
        if self.batch_size < 1:
            raise UserError(f"--batch-size must be positive, got {self.batch_size}")
        check_knobs(lr=self.lr, ema_decay=self.ema_decay, grad_clip=1.0, warmup=0,
                    checkpoint_every=self.checkpoint_every)


# Fields that must match to resume: they define the run's randomness and what each update computes.
RESUME_KEYS = ("batch_size", "lr", "ema_decay", "p_mean", "p_std", "q", "k", "b", "huber_c", "stage_updates", "data",
               "seed")


def edm_sigmas(alphas_cumprod) -> np.ndarray:
    """sigma_t = sqrt((1 - a-bar_t) / a-bar_t): EDM's noise level of each discrete timestep (increasing in t)."""
    ac = np.asarray(alphas_cumprod, dtype=np.float64)
    return np.sqrt((1.0 - ac) / ac)


def gap_end(sigma_t, stage: int, q: float, k: float, b: float):
    """ECT's r(t) (training/loss.py, t_to_r_sigmoid): the gap shrinks by q per stage, and more at small t."""
    import torch

    ratio = 1.0 - q ** -(stage + 1) * (1.0 + k * torch.sigmoid(-b * sigma_t))
    return torch.clamp(sigma_t * ratio, min=0.0)


class ConsistencyTuner:
    def __init__(self, cfg: ConsistencyConfig, resume: bool = False, progress: bool = True, echo=print):
        import torch

        cfg.check()
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.cfg, self.progress, self.echo = cfg, progress, echo
        self.out = check_writable_dir(cfg.out)
        claim_out(self.out, "consistency", resume)  # never over another run's (or another command's) checkpoint
        self.teacher_ckpt = ck = load_checkpoint(cfg.teacher)
        if ck.variance_type == "learned_range":
            raise UserError(f"{cfg.teacher}: cannot consistency-tune a learned-variance model (lcm uses no variance)")
        self.schedule = ck.schedule
        x0 = load_dataset(cfg.data, ck.image_size, split="train")
        if x0.shape[1:] != (ck.channels, ck.image_size, ck.image_size):
            raise UserError(f"data {cfg.data!r} has images {x0.shape[1:]}, the teacher takes "
                            f"{(ck.channels, ck.image_size, ck.image_size)}: give the teacher's training data")
        self.x0 = torch.from_numpy(x0)
        ac = self.schedule.alphas_cumprod
        self.alpha = torch.from_numpy(np.sqrt(ac))
        self.sigma_vp = torch.from_numpy(np.sqrt(1.0 - ac))
        self.sigmas = torch.from_numpy(edm_sigmas(ac))
        self.c = cfg.huber_c if cfg.huber_c is not None else 0.00054 * float(np.sqrt(np.prod(x0.shape[1:])))
        self.prediction_type = ck.prediction_type
        self.teacher = ck.build_unet().requires_grad_(False).eval()
        self.student = copy.deepcopy(self.teacher).train().requires_grad_(True)
        self.ema = copy.deepcopy(self.student).eval().requires_grad_(False)
        self.opt = torch.optim.RAdam(self.student.parameters(), lr=cfg.lr)
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.update, self.losses, self.loads, self.wall = 0, [], [], 0.0
        if resume:
            self._resume()

    @property
    def stage(self) -> int:
        return self.update // self.cfg.stage_updates

    def grid(self) -> list[int]:
        return lcm_timesteps(self.schedule.T, self.cfg.steps).tolist()

    # -- the objective -----------------------------------------------------------------------------
    def x0_hat(self, unet, x_t, t):
        """f(x_t, t): the network's x_0-prediction (its prediction type), unclipped."""
        out = unet(x_t, t).sample[:, : x_t.shape[1]]
        a, s = self.alpha[t].float().view(-1, 1, 1, 1), self.sigma_vp[t].float().view(-1, 1, 1, 1)
        if self.prediction_type == "epsilon":
            return (x_t - s * out) / a
        if self.prediction_type == "v_prediction":
            return a * x_t - s * out
        return out

    def timestep_of(self, sigma):
        """The discrete timestep whose sigma is nearest in log sigma (clamped to [0, T-1])."""
        import torch

        return torch.argmin(torch.abs(torch.log(self.sigmas)[None, :] - torch.log(sigma)[:, None]), dim=1)

    def draw_batch(self, gen, n: int, stage: int):
        """(x_t, t, x_r, r, x_0, weight) with shared eps; r = -1 where the gap's end is clean (sigma 0)."""
        import torch

        cfg = self.cfg
        u = torch.randn(n, generator=gen, dtype=torch.float64)
        t = self.timestep_of(torch.exp(u * cfg.p_std + cfg.p_mean))
        sigma_t = self.sigmas[t]
        r_sigma = gap_end(sigma_t, stage, cfg.q, cfg.k, cfg.b)
        r = torch.searchsorted(self.sigmas, r_sigma, right=True) - 1  # largest timestep with sigma <= r(t)
        r = torch.minimum(r, t - 1)
        sigma_r = torch.where(r >= 0, self.sigmas[r.clamp(min=0)], torch.zeros_like(sigma_t))
        idx = torch.randint(0, len(self.x0), (n,), generator=gen)
        eps = torch.randn((n, *self.x0.shape[1:]), generator=gen, dtype=torch.float64)
        x0 = self.x0[idx].double()
        noised = lambda s: self.alpha[s].view(-1, 1, 1, 1) * x0 + self.sigma_vp[s].view(-1, 1, 1, 1) * eps  # noqa: E731
        x_t, x_r = noised(t), noised(r.clamp(min=0))
        return x_t.float(), t, x_r.float(), r, x0.float(), (1.0 / (sigma_t - sigma_r)).float()

    def loss(self, unet, batch, target_unet=None):
        """Mean over images of (sqrt(||f(x_t) - f(x_r)||^2 + c^2) - c) / (sigma_t - sigma_r); f(x_r) without
        gradient, from `target_unet` (default: the same network, ECT's self-teacher), x_0 where r is clean."""
        import torch

        x_t, t, x_r, r, x0, weight = batch
        f_t = self.x0_hat(unet, x_t, t)
        with torch.no_grad():
            f_r = self.x0_hat(target_unet or unet, x_r, r.clamp(min=0))
            target = torch.where((r >= 0).view(-1, 1, 1, 1), torch.nan_to_num(f_r), x0)
        l2 = ((f_t - target) ** 2).flatten(1).sum(dim=1)
        return ((torch.sqrt(l2 + self.c ** 2) - self.c) * weight).mean()

    def eval_loss(self, unet=None, n: int = 256, seed: int = 1234, stage: int | None = None) -> float:
        """The loss on a fixed held-out draw (its own generator; training randomness untouched) at `stage`
        (default: the current one)."""
        import torch

        unet = self.ema if unet is None else unet
        batch = self.draw_batch(torch.Generator().manual_seed(seed), n, self.stage if stage is None else stage)
        with torch.inference_mode():
            return float(self.loss(unet, batch))

    def loss_step(self) -> float:
        loss = self.loss(self.student, self.draw_batch(self.gen, self.cfg.batch_size, self.stage))
        check_finite_update(f"update {self.update + 1}", "loss", loss.item(), self.cfg.lr)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        ema_update(self.ema, self.student, self.cfg.ema_decay)
        self.update += 1
        return loss.item()

    def _check_weights(self) -> None:
        """Nothing non-finite is saved: a checkpoint or student with inf/NaN weights is refused at its update."""
        name = nonfinite_tensor(self.student, self.ema)
        if name is not None:
            raise UserError(f"training diverged at update {self.update}: weight {name} is not finite (peak --lr "
                            f"{self.cfg.lr:g}); nothing from there on was saved: lower --lr (--resume continues the "
                            "last checkpoint with the new one)")

    # -- the loop ----------------------------------------------------------------------------------
    def run(self, stop_after: int | None = None) -> dict | None:
        """Updates up to cfg.updates, then the student and its card. `stop_after`: return after that many updates
        in this call, writing nothing but checkpoints (tests: a kill). Returns the card, None when stopped."""
        from ..progress import Progress

        self.out.mkdir(parents=True, exist_ok=True)
        cfg, done = self.cfg, 0
        start = time.time() - self.wall
        with Progress("consistency", cfg.updates, initial=min(self.update, cfg.updates), unit="upd",
                      enabled=self.progress) as bar:
            while self.update < cfg.updates:
                if stop_after is not None and done >= stop_after:
                    return None
                self.losses.append(self.loss_step())
                done += 1
                bar.update(1)
                if self.update % 10 == 0:
                    bar.set_postfix(loss=f"{np.mean(self.losses[-100:]):.4g}", stage=self.stage)
                if self.update % 50 == 0:
                    self.loads.append(os.getloadavg()[0])
                self.wall = time.time() - start
                if self.update % cfg.checkpoint_every == 0 and self.update < cfg.updates:
                    self.save_checkpoint()
        self.wall = time.time() - start
        self.save_checkpoint()
        return self._write_student()

    def _write_student(self) -> dict:
        self._check_weights()
        path = self.out / MODEL_NAME
        save_atomic(self._student_checkpoint(), path)
        card = self._card(path)
        write_text_atomic(json.dumps(card, indent=2) + "\n", self.out / "card.json")
        write_text_atomic(card_markdown(card), self.out / "card.md")
        self.echo(f"consistency tuning: {card['updates']} updates (stage {card['stage']}) in {card['wall_s']:.0f}s "
                  f"(load {card['load_avg']:.2f}), loss {card['loss_first100']:.4g} -> {card['loss_last200']:.4g}, "
                  f"held-out {card['eval_loss_start']:.4g} -> {card['eval_loss_end']:.4g}; wrote {path}")
        return card

    def _card(self, path: Path) -> dict:
        ck, cfg = self.teacher_ckpt, self.cfg
        losses = np.asarray(self.losses, dtype=np.float64)
        return {"model": str(path), "method": "consistency (ECT)", "teacher": cfg.teacher,
                "teacher_sha256": ck.sha256, "sampler": "lcm", "steps": cfg.steps, "timesteps": self.grid(),
                "prediction_type": self.prediction_type, "updates": self.update, "stage": self.stage,
                "stage_updates": cfg.stage_updates, "batch_size": cfg.batch_size, "lr": cfg.lr, "optimizer": "RAdam",
                "ema_decay": cfg.ema_decay, "p_mean": cfg.p_mean, "p_std": cfg.p_std, "q": cfg.q, "k": cfg.k,
                "b": cfg.b, "huber_c": self.c, "threads": cfg.threads, "wall_s": round(self.wall, 1),
                "load_avg": float(np.mean(self.loads)) if self.loads else os.getloadavg()[0],
                "loss_first100": float(losses[:100].mean()) if len(losses) else float("nan"),
                "loss_last200": float(losses[-200:].mean()) if len(losses) else float("nan"),
                "loss": "(sqrt(||f(x_t) - f(x_r)||^2 + c^2) - c) / (sigma_t - sigma_r), f = x0_hat",
                # the same fixed held-out draw at the final stage: the teacher (where the run started) and the EMA
                # student it ended with
                "eval_loss_start": self.eval_loss(self.teacher), "eval_loss_end": self.eval_loss()}

    # -- checkpoints -------------------------------------------------------------------------------
    def _student_checkpoint(self) -> dict:
        """An ordinary sampling checkpoint (EMA weights) that records lcm and its grid as its default sampler."""
        ck = self.teacher_ckpt
        grid = self.grid()
        return {"format": FORMAT, "format_version": FORMAT_VERSION, "unet": ck.unet,
                "schedule": ck.schedule.to_dict(), "variance_type": ck.variance_type,
                "clip_sample": ck.clip_sample, "clip_sample_range": ck.clip_sample_range,
                "prediction_type": self.prediction_type,
                "distilled": {"sampler": "lcm", "steps": len(grid), "timesteps": grid, "method": "consistency",
                              "teacher": self.cfg.teacher, "teacher_sha256": ck.sha256},
                "weights": self.ema.state_dict()}

    def save_checkpoint(self) -> None:
        self._check_weights()
        state = {"format": FORMAT, "format_version": FORMAT_VERSION, "kind": "consistency",
                 "config": asdict(self.cfg), "teacher_sha256": self.teacher_ckpt.identity_sha256, "update": self.update,
                 **loop_state(self.student, self.ema, self.opt, self.gen),
                 "losses": list(map(float, self.losses)), "loads": list(map(float, self.loads)),
                 "wall": float(self.wall)}
        save_atomic(state, self.out / CHECKPOINT_NAME)

    def _resume(self) -> None:
        path = self.out / CHECKPOINT_NAME
        state = resume_state(path, "consistency")
        check_same_run(state, path, self.cfg.teacher, self.teacher_ckpt.identity_sha256, self.cfg, RESUME_KEYS,
                       "tunes")
        self.update = checked_int(state.get("update"), "update", 0, 10 ** 9, path)
        restore_loop_state(state, self.student, self.ema, self.opt, self.gen, self.update, path)
        self.losses = checked_float_list(state.get("losses"), "losses", self.update, path)
        self.loads = checked_float_list(state.get("loads"), "loads", self.update // 50, path)
        wall = state.get("wall")
        if isinstance(wall, bool) or not isinstance(wall, (int, float)) or not (0 <= wall < float("inf")):
            raise UserError(f"{path}: field wall = {str(wall)[:40]} is not a wall time in seconds; the file is "
                            "damaged: resume from a good copy or start again")
        self.wall = float(wall)
        if self.update > self.cfg.updates:  # a longer run stopped early: the student is written from where it is
            self.echo(f"{path} is at update {self.update} (past --updates {self.cfg.updates}): writing the student "
                      "from there")
            self.cfg.updates = self.update


def card_markdown(card: dict) -> str:
    return (f"# Consistency-tuned student (ECT), sampler lcm\n\n"
            f"- teacher: {card['teacher']} (sha256 {card['teacher_sha256'][:12]}), {card['prediction_type']}\n"
            f"- samples with `lcm` by default: {card['steps']} steps on timesteps {card['timesteps']} (any step count "
            f"works: `--steps K`)\n"
            f"- updates: {card['updates']} at batch {card['batch_size']}, {card['optimizer']} lr {card['lr']}, EMA "
            f"{card['ema_decay']}; curriculum stage {card['stage']} (q {card['q']}, k {card['k']}, b {card['b']}, "
            f"{card['stage_updates']} updates per stage), t ~ LogNormal({card['p_mean']}, {card['p_std']}), "
            f"pseudo-Huber c {card['huber_c']:.4g}\n"
            f"- wall time: {card['wall_s']:.0f} s on {card['threads'] or 'default'} thread(s), load average "
            f"{card['load_avg']:.2f}\n"
            f"- loss ({card['loss']}): first 100 updates {card['loss_first100']:.4g}, last 200 "
            f"{card['loss_last200']:.4g}; on a fixed held-out draw {card['eval_loss_start']:.4g} (teacher) -> "
            f"{card['eval_loss_end']:.4g} (EMA student)\n")
