"""The training loop: epochs of training steps, evaluation, checkpoints, signals and logging.

`Trainer.fit` reads top to bottom: for each epoch, train (each micro-batch through the `TrainStep`;
after each optimizer step: log, maybe checkpoint, maybe stop), then evaluate the EMA weights, keep
the best by the fitness metric, stop early when it stops improving. Everything here runs on every
rank; only the main process writes files and MLflow. What the run tells its user beyond per-step
metrics (results table, pictures, summary) is `RunReport`'s.
"""

from __future__ import annotations

import math
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast, broadcast_object_list, gather_object
from torch.utils.data import DataLoader

from adyolo.engine.accelerator import any_rank
from adyolo.engine.checkpoint import TrainingState, latest_folder, roll_back_latest, save_resumable, write_failure
from adyolo.engine.config import LogConfig, TrainConfig
from adyolo.engine.memory import fullest_rank_gib, per_rank_metrics, reset_peaks, snapshot
from adyolo.engine.phases import PhaseTimes, format_breakdown
from adyolo.engine.report import RunReport
from adyolo.engine.step import LOSS_TERMS, TrainStep, Window
from adyolo.eval.evaluator import predict, score
from adyolo.failures import EXIT_NONFINITE, EXIT_STOPPED_BY_SIGNAL, RunFailure, WriteFailed
from adyolo.progress import Progress
from adyolo.tracking import Tracker
from adyolo.weights import save_weights

# What Slurm sends before preemption / time limit, and Ctrl-C: finish the step, save, stop (exit 75).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
FORCE_STOP_S = 5.0  # a second Ctrl-C within this many seconds stops at once, without saving


@dataclass
class TrainerParts:
    accelerator: Accelerator
    step: TrainStep  # the prepared model and optimizer, loss, schedule and EMA
    train_loader: DataLoader  # prepared (sharded over the ranks)
    val_loader: DataLoader  # prepared
    state: TrainingState
    tracker: Tracker
    report: RunReport
    phases: PhaseTimes  # where the wall time goes; the step times its own parts with the same object


class Trainer:
    """`train`, `log`: their config sections; `epochs`, `output_dir`: the run's; `record`: what each
    checkpoint's run.json holds (the resolved run config under "config", also saved in best.pt /
    last.pt; the ranks, micro-batch and ZeRO stage); `precision`: of validation."""

    def __init__(
        self,
        parts: TrainerParts,
        train: TrainConfig,
        log: LogConfig,
        epochs: int,
        output_dir: str | Path,
        record: dict,
        precision: str,
    ):
        self.parts = parts
        self.acc = parts.accelerator
        self.step = parts.step
        self.phases = parts.phases
        self.train = train
        self.log = log
        self.epochs = epochs
        self.output_dir = Path(output_dir)
        self.record = record
        self.autocast_dtype = torch.bfloat16 if precision == "bf16" else None
        self._stop_signal = 0
        self._interrupted_at = -math.inf  # time.monotonic() of the last Ctrl-C
        self._nonfinite_from_step = 0  # the step after which the current streak of non-finite losses began
        self._bad_images: set[int] = set()  # unreadable images met on this rank since the last log
        self._epoch_peak_gib = 0.0  # the fullest rank's peak memory in this epoch (0: not measured yet)
        self._bar = None  # the epoch's progress bar (its text is updated where values are logged)

    @property
    def _loss_terms(self) -> list[str]:
        """The loss terms worth a chart: the class loss is always 0 for a one-class detector."""
        one_class = self.step.loss_fn.num_classes == 1
        return [k for k in ("box", "obj", "cls", "landmark", "total") if not (k == "cls" and one_class)]

    # ------------------------------------------------------------------------------------------
    def fit(self) -> int:
        """Train to the end (or an early stop / signal), then end the accelerator's process group and
        trackers. Returns the process exit code. SIGTERM, SIGUSR1 and SIGINT are handled while it runs
        (and given back their previous handlers after); a second Ctrl-C in quick succession raises
        KeyboardInterrupt, with the MLflow run marked KILLED."""
        previous = {sig: signal.signal(sig, self._on_signal) for sig in STOP_SIGNALS}
        try:
            code = self._fit()
        except KeyboardInterrupt:
            self.parts.tracker.finish("KILLED")
            raise
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        self.acc.end_training()
        return code

    def _fit(self) -> int:
        state, epochs = self.parts.state, self.epochs
        self.phases.end_setup()
        try:
            while state.epoch < epochs:
                self._train_epoch()
                last = state.epoch == epochs - 1
                evaluate = last or (state.epoch + 1) % self.train.eval_interval == 0
                stop = self._evaluate() if evaluate else False
                state.epoch += 1
                state.batches_in_epoch = 0
                with self.phases("checkpoint"):
                    self._save_checkpoint()
                    self._save_weights("last.pt")
                if self.acc.is_main_process:
                    with self.phases("logging"):
                        self.parts.report.epoch_end(state.epoch, state.step, self._epoch_peak_gib or float("nan"))
                        self._log_times(state.epoch)
                self._epoch_peak_gib = 0.0
                if stop:
                    self.acc.print(
                        f"early stop: {self.train.fitness} has not improved for {self.train.patience} evaluations"
                    )
                    break
        except RunFailure as failure:
            # Every rank meets the failure together (the ranks agree on it), so one line says it all.
            if self.acc.is_main_process:
                signalled = failure.exit_code == EXIT_STOPPED_BY_SIGNAL
                print(str(failure) if signalled else f"error: {failure}", file=sys.stdout if signalled else sys.stderr)
            self._log_counters()
            self.parts.tracker.finish("KILLED" if failure.exit_code == EXIT_STOPPED_BY_SIGNAL else "FAILED")
            return failure.exit_code
        times = self._gather_times()
        if self.acc.is_main_process:
            weights = {"best": self.output_dir / "best.pt", "last": self.output_dir / "last.pt"}
            breakdown = format_breakdown(times[0]) if self.phases.enabled else None
            summary = self.parts.report.finish(state.best_epoch, state.best_fitness, weights, breakdown)
            print(summary, flush=True)
        self.parts.tracker.finish()
        return 0

    def _log_times(self, epoch: int) -> None:
        """The main rank's time per phase so far (`time/<phase>_s`), against the epoch."""
        if self.phases.enabled:
            self.parts.tracker.log_metrics({f"time/{k}_s": v for k, v in self.phases.breakdown().items()}, step=epoch)

    def _gather_times(self) -> list[dict[str, float]]:
        """Every rank's time per phase (a collective); with several ranks each is logged as
        `time/rank<r>/<phase>_s`, the main rank's also as `time/<phase>_s`."""
        if not self.phases.enabled:
            return [{}]
        times = gather_object([self.phases.breakdown()])
        metrics = {f"time/{k}_s": v for k, v in times[0].items()}
        if len(times) > 1:
            metrics.update({f"time/rank{r}/{k}_s": v for r, rank in enumerate(times) for k, v in rank.items()})
        self.parts.tracker.log_metrics(metrics, step=self.parts.state.epoch)
        return times

    # ------------------------------------------------------------------------------------------
    def _train_epoch(self) -> None:
        parts, state, acc = self.parts, self.parts.state, self.acc
        sampler = parts.train_loader.batch_sampler  # this rank's micro-batches (`GlobalBatchSampler`)
        sampler.set_epoch(state.epoch)
        parts.train_loader.dataset.set_epoch(state.epoch, self.epochs)
        sampler.skip(state.batches_in_epoch)  # resuming mid-epoch: what was already trained on
        self.step.model.train()
        self._bar = bar = Progress(
            total=len(parts.train_loader),
            initial=state.batches_in_epoch,
            desc=f"epoch {state.epoch + 1}/{self.epochs}",
            disable=not acc.is_main_process,
            every_s=self.log.progress_interval_s,
        )
        with bar:  # closed however the epoch ends, so that a message after it starts on its own line
            for batches in windows(self.phases.batches(parts.train_loader), self.step.accumulation):
                window = self.step(batches, state.step)
                state.batches_in_epoch += len(batches)
                bar.update(len(batches))
                for _ in range(window.nonfinite):
                    self._count_nonfinite()
                if window.stepped:
                    state.step += 1
                    if not window.nonfinite:
                        state.nonfinite_in_a_row = 0
                    self._bad_images |= window.skipped
                    if acc.is_main_process:
                        terms = dict(zip(LOSS_TERMS, window.terms))  # device values, read at the epoch's end
                        terms["total"] = sum(terms.values())
                        rate = window.images_per_s() * acc.num_processes
                        self.parts.report.add_step({k: terms[k] for k in self._loss_terms}, window.lr, rate)
                    self._after_optimizer_step(window)

    def _after_optimizer_step(self, window: Window) -> None:
        state = self.parts.state
        if state.step % self.train.log_interval == 0:
            with self.phases("logging"):
                self._log_step(window)
        if self.train.save_interval and state.step % self.train.save_interval == 0:
            with self.phases("checkpoint"):
                self._save_checkpoint()
        if self._any_rank_signalled():
            self._stop_for_signal("")

    def _log_step(self, window: Window) -> None:
        """Every rank reports its memory (a collective); the main process logs one series per rank."""
        acc, state = self.acc, self.parts.state
        gathered = acc.gather(snapshot(acc.device).to(acc.device)[None]).cpu()
        reset_peaks(acc.device)
        losses = window.losses()
        metrics = {f"train/loss_{k}": losses[k] for k in self._loss_terms}
        metrics.update(
            {
                "train/lr": window.lr,
                "train/images_per_s": window.images_per_s() * acc.num_processes,
                "train/epoch": state.epoch + state.batches_in_epoch / len(self.parts.train_loader),
            }
        )
        metrics.update(per_rank_metrics(gathered, acc.device.type))
        peak = fullest_rank_gib(gathered, acc.device.type)
        self._epoch_peak_gib = max(self._epoch_peak_gib, peak)
        self.parts.tracker.log_metrics(metrics, step=state.step)
        self._log_counters()
        text = " ".join(f"{k} {v:.4f}" for k, v in losses.items() if k != "cls")
        self._bar.set_postfix_str(f"{text} | {metrics['train/images_per_s']:.1f} img/s | {peak:.2f} GiB peak")

    def _log_counters(self) -> None:
        """Counters of what went wrong, charted from the first time they are not 0. Unreadable images
        count once per file, over every rank (a collective)."""
        state = self.parts.state
        seen = set(state.bad_images)
        new = self._bad_images - seen
        if any_rank(self.acc, bool(new)):  # the lists themselves only when some rank met a new one
            for indices in gather_object([sorted(new)]):
                seen.update(indices)
        state.bad_images, self._bad_images = sorted(seen), set()
        counters = {"train/skipped_images": len(state.bad_images), "train/nonfinite_steps": state.nonfinite_steps}
        self.parts.tracker.log_metrics({k: v for k, v in counters.items() if v}, step=state.step)

    # ------------------------------------------------------------------------------------------
    def _evaluate(self) -> bool:
        """Evaluate the EMA weights on every rank's shard, keep the best; returns whether to stop early."""
        parts, acc, state = self.parts, self.acc, self.parts.state
        with self.phases("validation"):
            local, gathered, scored = self._predict_and_score()
        if local is None:
            self._stop_for_signal(f" during validation (epoch {state.epoch + 1} is evaluated on --resume)")
        decision = [False, False]
        if acc.is_main_process:
            metrics, curves = scored
            fitness = metrics[self.train.fitness]
            improved = fitness > state.best_fitness
            if improved:
                state.best_fitness = fitness
                state.best_epoch = state.epoch + 1
                state.evals_without_improvement = 0
            else:
                state.evals_without_improvement += 1
            patience = self.train.patience
            decision = [improved, bool(patience) and state.evals_without_improvement >= patience]
            best = f"best: epoch {state.best_epoch}, {self.train.fitness} {state.best_fitness:.4f}"
            acc.print(
                f"epoch {state.epoch + 1}: {', '.join(f'{k} {v:.4f}' for k, v in metrics.items())} "
                + ("(new best)" if improved else f"({best})")
            )
            with self.phases("logging"):
                parts.report.evaluation(state.epoch + 1, metrics, improved, gathered, curves)
        broadcast_object_list(decision)
        if decision[0]:
            with self.phases("checkpoint"):
                self._save_weights("best.pt")
        return decision[1]

    def _predict_and_score(self) -> tuple:
        """(this rank's predictions, everyone's, the main rank's (metrics, curves)); Nones if a signal
        stopped the prediction."""
        self._sync_buffers()
        local = predict(
            self.step.ema.module,
            self.parts.val_loader,
            self.acc.device,
            self.autocast_dtype,
            progress=self.acc.is_main_process,
            stop=self._any_rank_signalled,  # Slurm's grace is short: save now, evaluate after --resume
        )
        if local is None:
            return None, None, None
        gathered = gather_object(local)
        return local, gathered, score(gathered) if self.acc.is_main_process else None

    def _sync_buffers(self) -> None:
        """BatchNorm statistics drift apart per rank under DeepSpeed; use rank 0's everywhere."""
        if self.acc.num_processes == 1:
            return
        for buffer in self.step.ema.module.buffers():
            buffer.copy_(broadcast(buffer.to(self.acc.device), from_process=0))

    def _save_weights(self, name: str) -> None:
        """best.pt / last.pt, by the main process; every rank learns whether it could be written."""
        error = None
        if self.acc.is_main_process:
            try:
                save_weights(
                    self.output_dir / name,
                    self.step.ema.module.state_dict(),
                    self.record["config"],
                    epoch=self.parts.state.epoch,
                    step=self.parts.state.step,
                    best_fitness=self.parts.state.best_fitness,
                )
            except Exception as err:  # torch.save says "iostream error" on a full disk
                error = err
        if any_rank(self.acc, error is not None):
            raise WriteFailed(write_failure(self.output_dir / name, error, latest_folder(self.output_dir)))

    # ------------------------------------------------------------------------------------------
    def _count_nonfinite(self) -> None:
        """Count a skipped non-finite micro-batch (or step); too many in a row save and stop the run."""
        state = self.parts.state
        state.nonfinite_steps += 1
        state.nonfinite_in_a_row += 1
        if state.nonfinite_in_a_row == 1:
            self._nonfinite_from_step = state.step
        if state.nonfinite_in_a_row < self.train.max_nonfinite_steps:
            return
        what = f"{state.nonfinite_in_a_row} micro-batches in a row had a non-finite loss"
        if self._weights_finite():  # the data or the loss, not the weights: this state is worth keeping
            saved = self._save_checkpoint()
            raise RunFailure(
                f"{what}; checkpoint {saved.name} saved. Check the data or lower optim.lr, then --resume",
                EXIT_NONFINITE,
            )
        # Forward passes in training mode have already written NaN into BatchNorm statistics, and the
        # weights of the step before the first non-finite loss are what diverged: `latest` goes back
        # to a checkpoint from before that step.
        start = self._nonfinite_from_step
        kept = [roll_back_latest(self.output_dir, start) if self.acc.is_main_process else None]
        broadcast_object_list(kept)
        advice = (
            f"latest now points to {kept[0].name}, the last checkpoint before them: lower optim.lr, then --resume"
            if kept[0] is not None
            else f"no checkpoint precedes step {start}: lower optim.lr and start again (--exist-ok)"
        )
        raise RunFailure(
            f"{what} from step {start} on and the weights are no longer finite (not saved); {advice}", EXIT_NONFINITE
        )

    def _weights_finite(self) -> bool:
        """Whether every rank's parameters (its ZeRO-3 shard) and buffers are finite (a collective)."""
        model = self.step.model
        local = [getattr(p, "ds_tensor", p) for p in model.parameters()] + list(model.buffers())
        bad = any(not torch.isfinite(t).all() for t in local if t.is_floating_point() and t.numel())
        return not any_rank(self.acc, bad)

    def _save_checkpoint(self) -> Path:
        """The resumable state of every rank at this step (see `adyolo.engine.checkpoint`)."""
        return save_resumable(
            self.acc, self.output_dir, self.parts.state.step, self.record, self.train.keep_checkpoints
        )

    def _stop_for_signal(self, when: str) -> None:
        saved = self._save_checkpoint()
        raise RunFailure(
            f"stopped by signal{when} at step {self.parts.state.step}; checkpoint {saved.name} saved, "
            "continue with --resume",
            EXIT_STOPPED_BY_SIGNAL,
        )

    def _on_signal(self, signum, frame) -> None:
        if signum == signal.SIGINT:
            now, first = time.monotonic(), self._interrupted_at
            self._interrupted_at = now
            if now - first < FORCE_STOP_S:
                raise KeyboardInterrupt
            if self.acc.is_main_process:
                print(
                    f"\nCtrl-C: stopping after this step with a checkpoint (Ctrl-C again within {FORCE_STOP_S:.0f} s "
                    "stops at once, without saving)",
                    file=sys.stderr,
                    flush=True,
                )
        self._stop_signal = signum

    def _any_rank_signalled(self) -> bool:
        return any_rank(self.acc, bool(self._stop_signal))


def windows(batches: Iterator[dict], size: int) -> Iterator[list[dict]]:
    """Consecutive groups of `size` batches: the micro-batches of each optimizer step (the sampler's
    epochs hold whole steps)."""
    window = []
    for batch in batches:
        window.append(batch)
        if len(window) == size:
            yield window
            window = []


__all__ = ["Trainer", "TrainerParts"]
