"""The training loop: steps, schedule, EMA, evaluation, checkpoints, signals and logging.

`Trainer.fit` reads top to bottom: for each epoch, train (each optimizer step: set the schedule,
forward, loss, backward, EMA, log, maybe checkpoint, maybe stop), then evaluate the EMA weights,
keep the best, stop early when they stop improving. Everything here runs on every rank; only the
main process writes files and MLflow.
"""

from __future__ import annotations

import signal
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import torch
from accelerate.utils import broadcast, broadcast_object_list, gather_object
from tqdm import tqdm

from adyolo.engine.checkpoint import TrainingState, save_resumable, save_weights
from adyolo.engine.ema import ModelEMA
from adyolo.engine.memory import per_rank_metrics, reset_peaks, snapshot
from adyolo.engine.optim import Schedule
from adyolo.engine.tracking import Tracker
from adyolo.eval.evaluator import predict, score
from adyolo.viz import draw_detections, plot_pr_curves

EXIT_STOPPED_BY_SIGNAL = 75  # EX_TEMPFAIL: checkpoint saved, resubmit with --resume
EXIT_NONFINITE = 3
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)  # what Slurm sends before preemption / time limit
LOSS_TERMS = ("box", "obj", "cls", "landmark")


class StopTraining(Exception):
    def __init__(self, exit_code: int, reason: str):
        super().__init__(reason)
        self.exit_code = exit_code


@dataclass
class TrainerParts:
    accelerator: object
    model: torch.nn.Module  # prepared (DDP / DeepSpeed engine / bare)
    optimizer: torch.optim.Optimizer  # prepared
    loss_fn: object
    train_loader: object  # prepared
    val_loader: object  # prepared
    ema: ModelEMA
    schedule: Schedule
    state: TrainingState
    tracker: Tracker


class Trainer:
    def __init__(self, parts: TrainerParts, run_cfg, precision: str, config_dict: dict):
        self.p = parts
        self.cfg = run_cfg
        self.config_dict = config_dict
        self.acc = parts.accelerator
        self.output_dir = Path(run_cfg.output_dir)
        self.autocast_dtype = torch.bfloat16 if precision == "bf16" else None
        self._stop_signal = 0
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._on_signal)

    # ------------------------------------------------------------------------------------------
    def fit(self) -> int:
        """Train to the end (or an early stop / signal). Returns the process exit code."""
        state, epochs = self.p.state, self.cfg.epochs
        try:
            while state.epoch < epochs:
                self._train_epoch()
                last = state.epoch == epochs - 1
                evaluate = last or (state.epoch + 1) % self.cfg.train.eval_interval == 0
                stop = self._evaluate(final=last) if evaluate else False
                state.epoch += 1
                state.batches_in_epoch = 0
                save_resumable(self.acc, self.output_dir, state.step, self.cfg.train.keep_checkpoints)
                self._save_weights("last.pt")
                if stop:
                    self.acc.print(f"early stop: ap_hard has not improved for {self.cfg.train.patience} evaluations")
                    break
        except StopTraining as stop:
            self.acc.print(str(stop))
            self.p.tracker.finish("KILLED" if stop.exit_code == EXIT_STOPPED_BY_SIGNAL else "FAILED")
            return stop.exit_code
        if self.acc.is_main_process and (self.output_dir / "best.pt").exists():
            self.p.tracker.log_artifact(self.output_dir / "best.pt", "weights")
        self.p.tracker.finish()
        return 0

    # ------------------------------------------------------------------------------------------
    def _train_epoch(self) -> None:
        p, state, acc = self.p, self.p.state, self.acc
        p.train_loader.set_epoch(state.epoch)
        p.train_loader.dataset.set_epoch(state.epoch)
        loader = p.train_loader
        if state.batches_in_epoch:  # resuming mid-epoch: skip what was already trained on
            loader = acc.skip_first_batches(p.train_loader, state.batches_in_epoch)
        p.model.train()
        total = len(p.train_loader)
        bar = tqdm(
            total=total,
            initial=state.batches_in_epoch,
            desc=f"epoch {state.epoch + 1}/{self.cfg.epochs}",
            disable=not acc.is_main_process,
            dynamic_ncols=True,
            leave=True,
        )
        window = Window()
        for batch in loader:
            state.batches_in_epoch += 1
            window_done = self.train_step(batch, window)
            bar.update(1)
            if window_done:
                if window.stepped:
                    self._after_optimizer_step(window, bar)
                window = Window()
        bar.close()

    def train_step(self, batch: dict, window: Window) -> bool:
        """One micro-batch (images uint8 [B, 3, H, W] and targets [M, 16] on the device): forward, loss,
        backward; at the end of an accumulation window also the optimizer step and the EMA update.
        Returns whether the window ended (`window.stepped`: whether the weights changed). This is
        all a training step is; `launch/bench.py` times exactly this."""
        p, state = self.p, self.p.state
        self._micro_step(batch, window)
        if not self.acc.sync_gradients:
            return False
        if window.stepped:
            state.step += 1
            if not window.nonfinite:
                state.nonfinite_in_a_row = 0
            p.ema.update(self.acc.unwrap_model(p.model))
            state.skipped_images += window.skipped
        elif not self._deepspeed:
            # The window's last micro-batch was skipped: drop the window's gradients. (DeepSpeed keeps
            # them and adds them to the next window's step.)
            p.optimizer.zero_grad(set_to_none=True)
        return True

    def _micro_step(self, batch: dict, window: Window) -> None:
        p, acc = self.p, self.acc
        images = batch["images"].float().div_(255)
        if self.cfg.train.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with acc.accumulate(p.model):
            # The schedule is written before backward: DeepSpeed steps inside backward.
            window.lr = p.schedule.apply(p.optimizer, self.p.state.step)
            # Mixed precision is applied by the wrapper: accelerate's autocast around forward, or
            # DeepSpeed's torch_autocast. The loss is computed in fp32.
            raw = p.model(images)
            losses = p.loss_fn(raw, batch["targets"])
            finite = torch.isfinite(losses["total"]).to(images.device, torch.float32)
            # Every rank must agree on skipping, or the collectives in backward would deadlock.
            if acc.reduce(finite, reduction="sum").item() < acc.num_processes:
                self._skip_nonfinite(window)
                return
            acc.backward(losses["total"])
            if acc.sync_gradients:
                window.stepped = True  # DeepSpeed stepped inside backward; otherwise step now
                if not self._deepspeed:
                    norm = acc.clip_grad_norm_(p.model.parameters(), self.cfg.optim.grad_clip or float("inf"))
                    if torch.isfinite(norm):  # never step into NaN weights
                        p.optimizer.step()
                    p.optimizer.zero_grad(set_to_none=True)
                    if not torch.isfinite(norm):  # a finite loss can still overflow in backward
                        window.stepped = False  # the norm is the same on every rank: all skip
                        self._skip_nonfinite(window)
        window.add(losses, len(images), int(batch["skipped"]))

    def _after_optimizer_step(self, window: Window, bar) -> None:
        state, acc = self.p.state, self.acc
        bar.set_postfix_str(f"{window.postfix()} | {float(snapshot(acc.device)[0]):.2f} GiB peak")
        if state.step % self.cfg.train.log_interval == 0:
            self._log_step(window)
        if self.cfg.train.save_interval and state.step % self.cfg.train.save_interval == 0:
            save_resumable(acc, self.output_dir, state.step, self.cfg.train.keep_checkpoints)
        if self._any_rank_signalled():
            save_resumable(acc, self.output_dir, state.step, self.cfg.train.keep_checkpoints)
            raise StopTraining(
                EXIT_STOPPED_BY_SIGNAL,
                f"stopped by signal at step {state.step}; checkpoint saved, continue with --resume",
            )

    def _log_step(self, window: Window) -> None:
        """Every rank reports its memory (a collective); the main process logs one series per rank."""
        acc, state = self.acc, self.p.state
        gathered = acc.gather(snapshot(acc.device).to(acc.device)[None]).cpu()
        reset_peaks(acc.device)
        metrics = {f"train/loss_{k}": v for k, v in window.mean_losses().items()}
        metrics.update(
            {
                "train/lr": window.lr,
                "train/images_per_s": window.images_per_s() * acc.num_processes,
                "train/skipped_images": state.skipped_images,
                "train/nonfinite_steps": state.nonfinite_steps,
                "train/epoch": state.epoch + state.batches_in_epoch / len(self.p.train_loader),
            }
        )
        metrics.update(per_rank_metrics(gathered))
        self.p.tracker.log_metrics(metrics, step=state.step)

    # ------------------------------------------------------------------------------------------
    def _evaluate(self, final: bool) -> bool:
        """Evaluate the EMA weights on every rank's shard, keep the best; returns whether to stop early."""
        p, acc, state = self.p, self.acc, self.p.state
        self._sync_buffers()
        local = predict(p.ema.module, p.val_loader, acc.device, self.autocast_dtype)
        gathered = gather_object(local)
        decision = [False, False]
        if acc.is_main_process:
            metrics, curves = score(gathered)
            fitness = metrics["ap_hard"]
            improved = fitness > state.best_fitness
            if improved:
                state.best_fitness = fitness
                state.evals_without_improvement = 0
            else:
                state.evals_without_improvement += 1
            patience = self.cfg.train.patience
            decision = [improved, bool(patience) and state.evals_without_improvement >= patience]
            self.p.tracker.log_metrics({f"val/{k}": v for k, v in metrics.items()}, step=state.step)
            acc.print(f"epoch {state.epoch + 1}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
            if final or decision[1]:
                self._log_pictures(gathered, curves)
        broadcast_object_list(decision)
        if decision[0]:
            self._save_weights("best.pt")
        return decision[1]

    def _sync_buffers(self) -> None:
        """BatchNorm statistics drift apart per rank under DeepSpeed; use rank 0's everywhere."""
        if self.acc.num_processes == 1:
            return
        for buffer in self.p.ema.module.buffers():
            buffer.copy_(broadcast(buffer.to(self.acc.device), from_process=0))

    def _save_weights(self, name: str) -> None:
        if self.acc.is_main_process:
            save_weights(
                self.output_dir / name,
                self.p.ema.module.state_dict(),
                self.config_dict,
                epoch=self.p.state.epoch,
                step=self.p.state.step,
                best_fitness=self.p.state.best_fitness,
            )

    def _log_pictures(self, gathered, curves) -> None:
        pictures = self.output_dir / "pictures"
        pictures.mkdir(parents=True, exist_ok=True)
        self.p.tracker.log_artifact(plot_pr_curves(curves, pictures / "pr_curve.png"), "plots")
        for path, dets, truth in gathered[: self.cfg.log.num_val_images]:
            image = cv2.imread(path)
            if image is not None:
                out = pictures / f"val_{Path(path).stem}.jpg"
                cv2.imwrite(str(out), draw_detections(image, dets[dets[:, 4] > 0.25], truth))
                self.p.tracker.log_artifact(out, "val_images")

    # ------------------------------------------------------------------------------------------
    def _skip_nonfinite(self, window: Window) -> None:
        """Count a skipped non-finite micro-batch; too many in a row save and stop the run."""
        state = self.p.state
        window.nonfinite = True
        state.nonfinite_steps += 1
        state.nonfinite_in_a_row += 1
        if state.nonfinite_in_a_row >= self.cfg.train.max_nonfinite_steps:
            save_resumable(self.acc, self.output_dir, state.step, self.cfg.train.keep_checkpoints)
            raise StopTraining(
                EXIT_NONFINITE,
                f"{state.nonfinite_in_a_row} micro-batches in a row had a non-finite loss; "
                f"checkpoint saved. Lower optim.lr or check the data, then --resume",
            )

    def _on_signal(self, signum, frame) -> None:
        self._stop_signal = signum

    def _any_rank_signalled(self) -> bool:
        flag = torch.tensor([float(self._stop_signal)], device=self.acc.device)
        return self.acc.reduce(flag, reduction="sum").item() > 0

    @property
    def _deepspeed(self) -> bool:
        return self.acc.distributed_type.name == "DEEPSPEED"


class Window:
    """Loss sums and timing of one optimizer step's micro-batches."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.sums = dict.fromkeys(LOSS_TERMS, 0.0)
        self.micro = 0
        self.images = 0
        self.stepped = False
        self.skipped = 0
        self.nonfinite = False
        self.lr = 0.0

    def add(self, losses: dict, images: int, skipped: int) -> None:
        for k in LOSS_TERMS:
            self.sums[k] += float(losses[k])
        self.micro += 1
        self.images += images
        self.skipped += skipped

    def mean_losses(self) -> dict[str, float]:
        n = max(self.micro, 1)
        means = {k: v / n for k, v in self.sums.items()}
        means["total"] = sum(means.values())
        return means

    def images_per_s(self) -> float:
        return self.images / max(time.perf_counter() - self.start, 1e-9)

    def postfix(self) -> str:
        losses = self.mean_losses()
        return " ".join(f"{k} {v:.4f}" for k, v in losses.items() if k != "cls") + f" | {self.images_per_s():.1f} img/s"


def rank_placement(accelerator) -> dict[str, str]:
    """{"rank{r}.host": ..., "rank{r}.device": ...} for every rank (a collective)."""
    device = accelerator.device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    here = (accelerator.process_index, socket.gethostname(), accelerator.local_process_index, f"{device} ({name})")
    tags = {}
    for rank, host, local, dev in gather_object([here]):
        tags[f"rank{rank}.host"] = host
        tags[f"rank{rank}.local_rank"] = str(local)
        tags[f"rank{rank}.device"] = dev
    return tags


__all__ = ["EXIT_NONFINITE", "EXIT_STOPPED_BY_SIGNAL", "Trainer", "TrainerParts", "rank_placement"]
