"""Progressive distillation (Salimans & Ho 2022, Algorithm 2): a student learns to take in one deterministic DDIM step
what its teacher takes in two, then becomes the teacher of the next round, halving the step count each round.

On an N-step student grid t_0 > t_1 > ... > t_{N-1} (and t_N = "clean", alpha = 1, sigma = 0) the teacher walks
the 2N-step grid it was itself distilled for (the student grid is every other point of it): t -> t' -> t''. With
alpha_t = sqrt(a-bar_t), sigma_t = sqrt(1 - a-bar_t) and x_hat the x_0-prediction, one DDIM (eta = 0) step is

    z_s = alpha_s * x_hat(z_t) + (sigma_s / sigma_t) * (z_t - alpha_t * x_hat(z_t)),

and the student's target x_tilde is the x_0 that makes its one step from z_t land on the teacher's z_t'' (DESIGN.md
§3e):  x_tilde = (z_t'' - (sigma_t'' / sigma_t) z_t) / (alpha_t'' - (sigma_t'' / sigma_t) alpha_t); at the final
step (t'' clean) this is the teacher's own x_hat. Loss: max(SNR_t, 1) * ||x_tilde - x_hat_student(z_t)||^2
("truncated SNR"). The student predicts v (or x_0 with `sample`), since x_0 from eps divides by alpha_T ~ 0.006.

The first grid is "trailing" (starts at t = T-1, Lin et al. 2024), so even a 1-step student starts from pure noise.
Every round writes an ordinary checkpoint (OUT/<N>step/model.pt) with `distilled: {"steps", "timesteps"}` and a
model card; OUT/checkpoint.pt holds everything needed to resume bit for bit (round, update, student, EMA, teacher,
optimizer, RNG), written atomically like the trainer's.
"""
# torch (the torch extra) and tqdm (50 ms to import) are imported where they run: importing this module needs neither.

from __future__ import annotations

import copy
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..errors import UserError
from ..files import check_writable_dir, write_text_atomic
from ..nn import load_checkpoint
from ..nn.checkpoint import FORMAT, FORMAT_VERSION, save_atomic
from ..sampling.timesteps import timesteps
from .data import load_dataset
from .state import (CHECKPOINT_NAME, check_finite_update, check_knobs, check_same_run, check_weights,
                    checked_float_list, checked_int, claim_out, ema_update, loop_state, nonfinite_tensor,
                    restore_loop_state, resume_state)

STUDENT_PREDICTION_TYPES = ("v_prediction", "sample")


@dataclass
class DistillConfig:
    teacher: str = "digits"
    out: str = "runs/distill"
    steps_to: int = 4
    teacher_steps: int = 16
    updates_per_round: list[int] = field(default_factory=lambda: [2000])  # one value, or one per round
    batch_size: int = 64
    lr: float = 1e-4
    warmup: int = 50
    ema_decay: float = 0.995
    grad_clip: float = 1.0
    prediction_type: str = "v_prediction"
    data: str = "digits"
    checkpoint_every: int = 100
    seed: int = 0
    threads: int | None = None

    def rounds(self) -> list[tuple[int, int]]:
        """(teacher steps, student steps) per round: N0 -> N0/2 -> ... -> steps_to."""
        out, n = [], self.teacher_steps
        while n > self.steps_to:
            out.append((n, n // 2))
            n //= 2
        return out

    def updates(self, r: int) -> int:
        u = self.updates_per_round
        return int(u[r] if r < len(u) else u[-1])

    def check(self) -> None:
        if self.prediction_type not in STUDENT_PREDICTION_TYPES:
            raise UserError(f"--prediction-type must be one of {', '.join(STUDENT_PREDICTION_TYPES)} (an eps "
                            f"student cannot take a 1-4 step first step), got {self.prediction_type!r}")
        n0, k = self.teacher_steps, self.steps_to
        if k < 1 or k & (k - 1) or n0 & (n0 - 1) or n0 <= k:
            raise UserError(f"--teacher-steps ({n0}) and --steps-to ({k}) must be powers of two with "
                            f"--teacher-steps > --steps-to, e.g. --teacher-steps 64 --steps-to 4")
        if any(u < 1 for u in self.updates_per_round) or not self.updates_per_round:
            raise UserError(f"--updates-per-round must be positive integers, got {self.updates_per_round}")
        if self.batch_size < 1:
            raise UserError(f"--batch-size must be positive, got {self.batch_size}")
        check_knobs(lr=self.lr, ema_decay=self.ema_decay, grad_clip=self.grad_clip, warmup=self.warmup,
                    checkpoint_every=self.checkpoint_every)


# Fields that must match to resume: they define the run's randomness and its rounds' meaning.
RESUME_KEYS = ("teacher_steps", "batch_size", "prediction_type", "data", "seed", "ema_decay", "grad_clip", "warmup")


class Model:
    """A UNet and how to read its output as x_0: the teacher of a round, or the student."""

    def __init__(self, unet, prediction_type: str, clip: float | None):
        self.unet, self.prediction_type, self.clip = unet, prediction_type, clip

    def x0_and_eps(self, z, t, alpha, sigma):
        """(x_hat, eps_hat) from the network at (z, t); alpha/sigma broadcast per image (float64 math).

        x_hat is clipped when the model samples clipped (clip_sample); eps_hat is the network's, as the project's
        DDIM (and diffusers' use_clipped_model_output=False) takes it."""
        out = self.unet(z.float(), t).sample.double()
        if self.prediction_type == "epsilon":
            eps = out
            x0 = (z - sigma * eps) / alpha
        elif self.prediction_type == "v_prediction":
            x0 = alpha * z - sigma * out
            eps = sigma * z + alpha * out
        elif self.prediction_type == "sample":
            x0 = out
            eps = (z - alpha * x0) / sigma
        else:
            raise UserError(f"cannot distill a {self.prediction_type!r} model")
        if self.clip is not None:
            x0 = x0.clamp(-self.clip, self.clip)
        return x0, eps


def ddim_step(x0, eps, alpha_s, sigma_s):
    """DDIM eta = 0 (Song et al. eq. 12): z_s = alpha_s x_hat + sigma_s eps_hat."""
    return alpha_s * x0 + sigma_s * eps


def distill_target(z_t, z_t2, alpha_t, sigma_t, alpha_t2, sigma_t2):
    """The x_0 whose one DDIM step from z_t lands on z_t2 (DESIGN.md §3e); = z_t2 when t2 is clean (sigma 0)."""
    ratio = sigma_t2 / sigma_t
    return (z_t2 - ratio * z_t) / (alpha_t2 - ratio * alpha_t)


class Distiller:
    def __init__(self, cfg: DistillConfig, resume: bool = False, progress: bool = True, echo=print):
        import torch

        cfg.check()
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.cfg, self.progress, self.echo = cfg, progress, echo
        self.out = check_writable_dir(cfg.out)
        claim_out(self.out, "distill", resume)
        self.teacher_ckpt = load_checkpoint(cfg.teacher)
        ck = self.teacher_ckpt
        if ck.variance_type == "learned_range":
            raise UserError(f"{cfg.teacher}: cannot distill a learned-variance model (a DDIM student has no variance)")
        self.schedule = ck.schedule
        if cfg.teacher_steps > self.schedule.T:
            raise UserError(f"--teacher-steps {cfg.teacher_steps} exceeds the teacher's T={self.schedule.T}")
        x0 = load_dataset(cfg.data, ck.image_size, split="train")
        if x0.shape[1:] != (ck.channels, ck.image_size, ck.image_size):
            raise UserError(f"data {cfg.data!r} has images {x0.shape[1:]}, the teacher takes "
                            f"{(ck.channels, ck.image_size, ck.image_size)}: give the teacher's training data")
        self.x0 = torch.from_numpy(x0)
        ac = self.schedule.alphas_cumprod
        # Index T (one past the end) stands for "clean": alpha = 1, sigma = 0 (diffusers' set_alpha_to_one).
        self.alpha = torch.from_numpy(np.append(np.sqrt(ac), 1.0))
        self.sigma = torch.from_numpy(np.append(np.sqrt(1.0 - ac), 0.0))
        self.teacher = Model(ck.build_unet().requires_grad_(False), ck.prediction_type, self._first_clip())
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.round, self.update, self.losses, self.loads, self.round_wall = 0, 0, [], [], 0.0
        self.cards: list[dict] = []
        self.grid = timesteps(self.schedule.T, cfg.teacher_steps, "trailing")  # the current teacher's grid
        self._new_student()
        if resume:
            self._resume()

    def _first_clip(self) -> float | None:
        """The first teacher's x_0 clip (its clip_sample); later teachers are students, which do not clip."""
        ck = self.teacher_ckpt
        return float(ck.clip_sample_range) if ck.clip_sample else None

    def grid_of_round(self, r: int) -> np.ndarray:
        """Round r's teacher grid: the trailing grid of --teacher-steps, halved r times (every other point)."""
        return timesteps(self.schedule.T, self.cfg.teacher_steps, "trailing")[::2 ** r]

    # -- rounds ------------------------------------------------------------------------------------
    def _new_student(self) -> None:
        """Student = copy of the teacher (Algorithm 2), read as v (or x_0); fresh optimizer per round."""
        import torch

        self.student = copy.deepcopy(self.teacher.unet).train().requires_grad_(True)
        self.ema = copy.deepcopy(self.student).eval().requires_grad_(False)
        self.opt = torch.optim.AdamW(self.student.parameters(), lr=self.cfg.lr, weight_decay=0.0)

    def _student_model(self, unet) -> Model:
        return Model(unet, self.cfg.prediction_type, None)

    @property
    def student_grid(self) -> np.ndarray:
        return self.grid[::2]

    def lr_at(self, update: int, total: int) -> float:
        """Linear warm-up, then linear decay to 0 at the end of the round (Salimans & Ho anneal to 0 per round)."""
        warm = min(1.0, (update + 1) / max(1, self.cfg.warmup))
        return self.cfg.lr * warm * max(0.0, 1.0 - update / total)

    def draw_batch(self, gen, batch_size: int):
        """z_t on the student grid and the student's target from the teacher's two DDIM steps t -> t' -> t''.
        Returns (z_t float32, t, x_tilde float32, weight = max(SNR_t, 1))."""
        import torch

        n_t = len(self.grid)
        grid = torch.from_numpy(np.append(self.grid, self.schedule.T))  # teacher grid + "clean"
        i = torch.randint(0, n_t // 2, (batch_size,), generator=gen)
        idx = torch.randint(0, len(self.x0), (batch_size,), generator=gen)
        noise = torch.randn((batch_size, *self.x0.shape[1:]), generator=gen, dtype=torch.float64)
        t, t1, t2 = grid[2 * i], grid[2 * i + 1], grid[2 * i + 2]
        a = lambda s: self.alpha[s].view(-1, 1, 1, 1)  # noqa: E731
        s = lambda s_: self.sigma[s_].view(-1, 1, 1, 1)  # noqa: E731
        z_t = a(t) * self.x0[idx].double() + s(t) * noise
        with torch.inference_mode():
            x0, eps = self.teacher.x0_and_eps(z_t, t, a(t), s(t))
            z_t1 = ddim_step(x0, eps, a(t1), s(t1))
            x0, eps = self.teacher.x0_and_eps(z_t1, t1, a(t1), s(t1))  # t' is never clean
            z_t2 = ddim_step(x0, eps, a(t2), s(t2))
            target = distill_target(z_t, z_t2, a(t), s(t), a(t2), s(t2)).float()
        weight = torch.clamp((a(t) / s(t)) ** 2, min=1.0).float().view(-1)
        return z_t.float(), t, target, weight

    def weighted_loss(self, unet, z_t, t, target, weight):
        """max(SNR_t, 1) * mean over pixels of (x_tilde - x_hat_student)^2, averaged over the batch."""
        a, s = self.alpha[t].view(-1, 1, 1, 1).float(), self.sigma[t].view(-1, 1, 1, 1).float()
        x0_student, _ = self._student_model(unet).x0_and_eps(z_t, t, a, s)
        return (weight * ((target - x0_student.float()) ** 2).mean(dim=(1, 2, 3))).mean()

    def eval_loss(self, unet=None, n: int = 256, seed: int = 1234) -> float:
        """The round's loss on a fixed held-out draw (its own generator: training randomness is untouched)."""
        import torch

        unet = self.ema if unet is None else unet
        batch = self.draw_batch(torch.Generator().manual_seed(seed), n)
        with torch.inference_mode():
            return float(self.weighted_loss(unet, *batch))

    def loss_step(self, total: int) -> float:
        import torch

        cfg = self.cfg
        loss = self.weighted_loss(self.student, *self.draw_batch(self.gen, cfg.batch_size))
        check_finite_update(self._where(), "loss", loss.item(), cfg.lr)
        for g in self.opt.param_groups:
            g["lr"] = self.lr_at(self.update, total)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(self.student.parameters(), cfg.grad_clip)
        check_finite_update(self._where(), "gradient norm", float(norm), cfg.lr)
        self.opt.step()
        ema_update(self.ema, self.student, cfg.ema_decay)
        self.update += 1  # weights an update made non-finite: the next loss, or the check before any save
        return loss.item()

    def _where(self) -> str:
        return f"round {self.round + 1} update {self.update + 1}"

    def _check_finite_weights(self) -> None:
        """Before any save (a check over every tensor: too slow for every update, where the loss and gradient
        norm are checked instead)."""
        name = nonfinite_tensor(self.student, self.ema)
        if name is not None:
            raise UserError(f"distillation diverged by round {self.round + 1} update {self.update}: weight {name} is "
                            f"not finite (peak --lr {self.cfg.lr:g}); nothing from this update on was saved: lower "
                            "--lr")

    def run(self, stop_after: int | None = None) -> list[dict]:
        """All rounds to --steps-to. `stop_after`: return after that many updates in this call (tests: a kill)."""
        from tqdm import tqdm

        self.out.mkdir(parents=True, exist_ok=True)
        rounds, done = self.cfg.rounds(), 0
        while self.round < len(rounds):
            n_t, n_s = rounds[self.round]
            total = self.cfg.updates(self.round)
            bar = tqdm(total=total, initial=self.update, disable=not self.progress, desc=f"distill {n_t}->{n_s}",
                       unit="upd")
            start = time.time() - self.round_wall
            while self.update < total:
                if stop_after is not None and done >= stop_after:
                    bar.close()
                    return self.cards
                self.losses.append(self.loss_step(total))
                done += 1
                bar.update(1)
                if self.update % 10 == 0:
                    bar.set_postfix(loss=f"{np.mean(self.losses[-100:]):.4f}")
                if self.update % 50 == 0:
                    self.loads.append(os.getloadavg()[0])
                self.round_wall = time.time() - start
                if self.update % self.cfg.checkpoint_every == 0 and self.update < total:
                    self.save_checkpoint()
                    if not self.progress:  # a log file instead of a bar (nohup runs)
                        self.echo(f"round {self.round + 1} ({n_t}->{n_s}) update {self.update}/{total}: loss "
                                  f"{np.mean(self.losses[-100:]):.4g}, {self.round_wall:.0f}s, "
                                  f"load {os.getloadavg()[0]:.2f}")
            bar.close()
            self.round_wall = time.time() - start
            self._finish_round(n_t, n_s, total)
        return self.cards

    def _finish_round(self, n_t: int, n_s: int, total: int) -> None:
        """Write the round's model and card, make the student the next teacher, checkpoint."""
        folder = self.out / f"{n_s}step"
        path = folder / "model.pt"
        card = self._card(n_t, n_s, total, path)  # first: its held-out loss is the student's last finiteness check
        if not np.isfinite(card["eval_loss_end"]):
            raise UserError(f"distillation diverged in round {self.round + 1}: the EMA student's held-out loss is "
                            f"{card['eval_loss_end']} (peak --lr {self.cfg.lr:g}); {path} was not written: lower --lr")
        self._check_finite_weights()
        folder.mkdir(parents=True, exist_ok=True)
        save_atomic(self._student_checkpoint(), path)
        write_text_atomic(json.dumps(card, indent=2) + "\n", folder / "card.json")
        write_text_atomic(card_markdown(card), folder / "card.md")
        self.cards.append(card)
        self.echo(f"round {self.round + 1}: {n_t} -> {n_s} steps, {total} updates in {card['wall_s']:.0f}s "
                  f"(load {card['load_avg']:.2f}), loss {card['loss_first100']:.4g} -> {card['loss_last200']:.4g}, "
                  f"held-out {card['eval_loss_start']:.4g} -> {card['eval_loss_end']:.4g}; wrote {path}")
        self.teacher = self._student_model(copy.deepcopy(self.ema).requires_grad_(False))
        self.grid = self.student_grid
        self.round += 1
        self.update, self.losses, self.loads, self.round_wall = 0, [], [], 0.0
        self._new_student()
        self.save_checkpoint()

    def _card(self, n_t: int, n_s: int, total: int, path: Path) -> dict:
        ck, cfg = self.teacher_ckpt, self.cfg
        losses = np.asarray(self.losses, dtype=np.float64)
        return {"model": str(path), "round": self.round + 1, "teacher": cfg.teacher,
                "teacher_sha256": ck.identity_sha256,
                "teacher_steps": n_t, "steps": n_s, "timesteps": [int(t) for t in self.student_grid],
                "prediction_type": cfg.prediction_type, "updates": total, "batch_size": cfg.batch_size,
                "lr": cfg.lr, "lr_schedule": f"linear warm-up {cfg.warmup}, linear decay to 0",
                "ema_decay": cfg.ema_decay, "threads": cfg.threads, "wall_s": round(self.round_wall, 1),
                "load_avg": float(np.mean(self.loads)) if self.loads else os.getloadavg()[0],
                "loss_first100": float(losses[:100].mean()) if len(losses) else float("nan"),
                "loss_last200": float(losses[-200:].mean()) if len(losses) else float("nan"),
                "loss": "max(SNR_t, 1) * mean ||x_tilde - x_hat||^2 (truncated SNR)",
                # the same fixed held-out draw of z_t: the teacher's copy read as a student (where the round
                # started) and the EMA student it ended with
                "eval_loss_start": self.eval_loss(self.teacher.unet), "eval_loss_end": self.eval_loss()}

    # -- checkpoints -------------------------------------------------------------------------------
    def _student_checkpoint(self) -> dict:
        """An ordinary sampling checkpoint (EMA weights) that records the grid it was distilled for."""
        ck = self.teacher_ckpt
        n_s = len(self.student_grid)
        return {"format": FORMAT, "format_version": FORMAT_VERSION, "unet": ck.unet,
                "schedule": ck.schedule.to_dict(), "variance_type": ck.variance_type,
                # No x_0 clip: the target x_tilde is what lands exactly on the teacher's z_t''; clipping it
                # would move the step off the distilled path.
                "clip_sample": False, "clip_sample_range": 1.0, "prediction_type": self.cfg.prediction_type,
                "distilled": {"steps": n_s, "timesteps": [int(t) for t in self.student_grid],
                              "teacher": self.cfg.teacher, "teacher_sha256": ck.identity_sha256,
                              "teacher_steps": 2 * n_s},
                "weights": self.ema.state_dict()}

    def save_checkpoint(self) -> None:
        self._check_finite_weights()
        state = {"format": FORMAT, "format_version": FORMAT_VERSION, "kind": "distill",
                 "config": asdict(self.cfg), "teacher_sha256": self.teacher_ckpt.identity_sha256,
                 "round": self.round, "update": self.update, "grid": [int(t) for t in self.grid],
                 "teacher_prediction_type": self.teacher.prediction_type,
                 "teacher_clip": -1.0 if self.teacher.clip is None else float(self.teacher.clip),
                 "teacher_weights": self.teacher.unet.state_dict(),
                 **loop_state(self.student, self.ema, self.opt, self.gen), "losses": list(map(float, self.losses)),
                 "loads": list(map(float, self.loads)),
                 "round_wall": float(self.round_wall), "cards_json": json.dumps(self.cards)}
        save_atomic(state, self.out / CHECKPOINT_NAME)

    def _resume(self) -> None:
        """Continue OUT/checkpoint.pt. What can be derived is derived (the round's grid from T, --teacher-steps and
        the round; the teacher's prediction type and clip from the round) and must agree with the file; counters
        are range-checked, tensors checked against the models (state.restore_loop_state)."""
        path = self.out / CHECKPOINT_NAME
        state = resume_state(path, "distill")
        check_same_run(state, path, self.cfg.teacher, self.teacher_ckpt.identity_sha256, self.cfg, RESUME_KEYS,
                       "distills")
        rounds = self.cfg.rounds()
        self.round = checked_int(state.get("round"), "round", 0, len(rounds), path,
                                 f" (the rounds from --teacher-steps {self.cfg.teacher_steps} to --steps-to "
                                 f"{self.cfg.steps_to}): resume with the --steps-to it was started with")
        total = self.cfg.updates(self.round) if self.round < len(rounds) else 0
        update = state.get("update")
        if isinstance(update, int) and not isinstance(update, bool) and update >= max(total, 1):
            raise UserError(f"{path} is at update {update} of round {self.round + 1}; "
                            f"--updates-per-round must be larger than that to go on")
        self.update = checked_int(update, "update", 0, max(total - 1, 0), path)
        self.grid = self.grid_of_round(self.round)
        if state.get("grid") != [int(t) for t in self.grid]:
            raise UserError(f"{path}: field grid = {str(state.get('grid'))[:80]} is not round {self.round + 1}'s "
                            f"grid {self.grid.tolist()} (from T={self.schedule.T}, --teacher-steps "
                            f"{self.cfg.teacher_steps}); the file is damaged: resume from a good copy or start again")
        if self.round == 0:
            pred, clip = self.teacher_ckpt.prediction_type, self._first_clip()
        else:
            pred, clip = self.cfg.prediction_type, None
        if (state.get("teacher_prediction_type"), state.get("teacher_clip")) != (pred, -1.0 if clip is None else clip):
            raise UserError(f"{path}: fields teacher_prediction_type/teacher_clip = "
                            f"{str(state.get('teacher_prediction_type'))[:20]}/{str(state.get('teacher_clip'))[:20]} "
                            f"are not round {self.round + 1}'s teacher's ({pred}/{-1.0 if clip is None else clip}); "
                            "the file is damaged: resume from a good copy or start again")
        check_weights(state, "teacher_weights", self.teacher.unet, path)
        if self.round == 0 and not _same_weights(state["teacher_weights"], self.teacher.unet.state_dict()):
            raise UserError(f"{path}: round 1's teacher weights differ from {self.cfg.teacher}'s; the file is "
                            "damaged: resume from a good copy or start again")
        self.teacher = Model(self.teacher.unet, pred, clip)
        self.teacher.unet.load_state_dict(state["teacher_weights"])
        self._new_student()
        restore_loop_state(state, self.student, self.ema, self.opt, self.gen, self.update, path)
        self.losses = checked_float_list(state.get("losses"), "losses", self.update, path)
        self.loads = checked_float_list(state.get("loads"), "loads", self.update // 50, path)
        wall = state.get("round_wall")
        if isinstance(wall, bool) or not isinstance(wall, (int, float)) or not 0 <= wall < float("inf"):
            raise UserError(f"{path}: field round_wall = {str(wall)[:40]} must be a finite number of seconds >= 0")
        self.round_wall = float(wall)
        self.cards = _checked_cards(state.get("cards_json"), self.round, path)


def _same_weights(a: dict, b: dict) -> bool:
    import torch

    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _checked_cards(text, n: int, path: Path) -> list[dict]:
    """The finished rounds' model cards: a JSON list of n objects."""
    try:
        cards = json.loads(text) if isinstance(text, str) else None
    except (ValueError, RecursionError):
        cards = None
    if not isinstance(cards, list) or len(cards) != n or not all(isinstance(c, dict) for c in cards):
        raise UserError(f"{path}: field cards_json must be a JSON list of {n} model card(s), one per finished round; "
                        "the file is damaged: resume from a good copy or start again")
    return cards


def card_markdown(card: dict) -> str:
    return (f"# {card['steps']}-step student (progressive distillation, round {card['round']})\n\n"
            f"- teacher: {card['teacher']} (sha256 {card['teacher_sha256'][:12]}), sampled with DDIM on "
            f"{card['teacher_steps']} steps\n"
            f"- student: {card['prediction_type']}, DDIM (eta 0) on timesteps {card['timesteps']}\n"
            f"- updates: {card['updates']} at batch {card['batch_size']}, lr {card['lr']} ({card['lr_schedule']}), "
            f"EMA {card['ema_decay']}\n"
            f"- wall time: {card['wall_s']:.0f} s on {card['threads'] or 'default'} thread(s), "
            f"load average {card['load_avg']:.2f}\n"
            f"- loss ({card['loss']}): first 100 updates {card['loss_first100']:.4g}, last 200 "
            f"{card['loss_last200']:.4g}; on a fixed held-out draw {card['eval_loss_start']:.4g} (teacher copy) -> "
            f"{card['eval_loss_end']:.4g} (EMA student)\n")
