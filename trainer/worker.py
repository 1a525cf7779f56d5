"""A fine-tuning worker: takes jobs from the registry's queue (``adapters_registry.job_queue``) and
runs them with this trainer, for one base model.

For each job it claims, a worker either validates its files (the trainer's own loaders,
then the training tokens against the tenant's ``max_training_tokens``) and queues it, or
trains it: the base's frozen template, the method's defaults with the job's
hyperparameters, its held-out validation file if any, and the tenant's adapter to continue
from if the job's ``model`` names one. Every epoch is an event (losses) and a checkpoint
(the LoRA weights, in the artifact store); the data report and every gate are events. A job
whose gates pass is published as a new version of the tenant's adapter (``suffix``, else
``ft-<job>``), moving no alias; a job whose gates fail publishes nothing.

While it runs, a heartbeat thread renews the job's lease every ``heartbeat_s``; when the
job is cancelled (or the lease lost) the next optimizer step stops the run. A worker asked
to stop (``stop``: SIGTERM) ends its run the same way and hands the job back to the queue,
to resume from its last checkpoint on the next worker. A run taken over from a lost or
stopped worker resumes from its last checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import re
import signal
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adapters_registry import (
    JOB_KEY,
    AdapterManifest,
    Checkpoint,
    Job,
    JobQueue,
    Registry,
    RegistryError,
    sha256_file,
    sha256_json,
)
from trainer.config import RunConfig
from trainer.errors import GateFailedError, RunStopped, TrainerError
from trainer.job_inputs import JobInputError, datasets, eval_sets, init_adapter, items, run_config
from trainer.loop import EpochStats, RunHooks

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerOptions:
    name: str  # shown in job rows and the audit trail; unique per worker process
    base_dir: Path  # the base model's directory (the base of the jobs this worker takes)
    base_model_id: str
    lease_s: float = 30.0  # a job whose worker stops renewing for this long is failed
    heartbeat_s: float = 2.0  # how often the lease is renewed and a cancel noticed
    poll_s: float = 2.0  # how long an idle worker waits before it looks for work again
    scratch: Path | None = None  # where runs write (default: the system's temporary folder)


class Worker:
    def __init__(self, registry: Registry, options: WorkerOptions) -> None:
        self.registry = registry
        self.options = options
        self.queue: JobQueue = registry.job_queue
        self.stop = threading.Event()
        self._tokenizer: Any = None

    def template_ids(self) -> list[str]:
        return [t.template_id for _, t in self.registry.catalog.templates(self.options.base_model_id)]

    def run(self) -> None:
        """Take and run jobs until ``stop`` is set."""
        logger.info("fine-tuning worker %s: jobs for %s", self.options.name, self.options.base_model_id)
        while not self.stop.is_set():
            try:
                worked = self.run_once()
            except RegistryError as exc:  # the database or store is away: try again later
                logger.warning("fine-tuning worker %s: %s", self.options.name, exc)
                worked = False
            if not worked:
                self.stop.wait(self.options.poll_s)

    def run_once(self) -> bool:
        """Claim one job and run it (validate or train); False when there was none."""
        job = self.queue.claim(self.options.name, template_ids=self.template_ids(),
                               lease_s=self.options.lease_s)
        if job is None:
            return False
        logger.info("job %s (%s): %s", job.id, job.tenant, job.status)
        with self._heartbeat(job) as lost, tempfile.TemporaryDirectory(
                prefix=f"lgw-{job.id}-", dir=self.options.scratch) as scratch:
            try:
                if job.status == "validating_files":
                    self._validate(job, Path(scratch))
                else:
                    self._train(job, Path(scratch), lost)
            except RunStopped:
                if self.stop.is_set() and not lost.is_set():
                    self.queue.release(job.id, self.options.name, "was shut down during the run")
                logger.info("job %s: run stopped", job.id)
            except TrainerError as exc:
                self._fail(job, "training_error", self._tenants_view(str(exc), Path(scratch)))
            except RegistryError as exc:
                self._fail(job, "registry_error", str(exc))
            except Exception as exc:  # a bug must fail the job, not kill the worker
                logger.exception("job %s failed", job.id)
                self._fail(job, "internal_error", f"the worker failed: {type(exc).__name__}: {exc}")
        return True

    # -- validation ---------------------------------------------------------------------

    def _inputs(self, job: Job, scratch: Path) -> tuple[RunConfig, Any, Any, Any, Any] | None:
        """(config, train, validation, golden, regression); None after failing the job."""
        try:
            train, validation = datasets(self.registry.files, job, scratch)
            golden, regression = eval_sets(self.registry.files, job, scratch)
        except JobInputError as exc:
            self._fail(job, exc.code, exc.message, exc.param)
            return None
        return run_config(job), train, validation, golden, regression

    def _validate(self, job: Job, scratch: Path) -> None:
        inputs = self._inputs(job, scratch)
        if inputs is None:
            return
        config, train, validation, golden, _ = inputs
        from trainer.data import prepare_data
        from trainer.preference import prepare_preferences

        prepare: Any = prepare_preferences if job.method == "dpo" else prepare_data
        gated = (config.preference_min_accuracy is not None or config.preference_min_margin is not None
                 if job.method == "dpo" else config.max_val_perplexity is not None)
        # as the run will: training examples that repeat a golden prompt are dropped
        report = prepare(train, config, golden.prompts() if golden else (), golden.path if golden else None,
                         held_out=validation).report
        self.queue.event(job.id, f"Training file: {report.read} examples, {report.train} to train on, "
                        f"{report.validation} held out", data=report.to_dict())
        if gated and not report.validation:
            self._fail(job, "invalid_training_file",
                       f"the job's gates need held-out examples, and none remain ({report.train} "
                       f"examples, validation_fraction {config.validation_fraction}): give a "
                       "validation_file or more examples", "validation_file")
            return
        tokens = self._tokens(job, train, config) * config.epochs
        limit = job.limits.max_training_tokens
        if limit is not None and tokens > limit:
            self._fail(job, "exceeds_token_limit",
                       f"the training file trains {tokens} tokens ({tokens // config.epochs} per "
                       f"epoch x {config.epochs} epochs), over this tenant's limit of {limit} "
                       "(max_training_tokens): use fewer examples or epochs", "training_file")
            return
        self.queue.validated(job.id, self.options.name, tokens)

    def _tokens(self, job: Job, dataset: Any, config: RunConfig) -> int:
        """Tokens per epoch: every token of every example, as it is rendered for training."""
        tokenizer = self._tokenizer_once()
        if job.method == "dpo":
            from trainer.dpo import encode_pairs

            rows, _ = encode_pairs(tokenizer, dataset.pairs, config.max_length)
            return sum(len(r["prompt_ids"]) + len(r["chosen_ids"]) + len(r["rejected_ids"]) for r in rows)
        from trainer.sft import encode_example

        return sum(len(encode_example(tokenizer, m, config.max_length).input_ids) for m in dataset.examples)

    # -- training -----------------------------------------------------------------------

    def _train(self, job: Job, scratch: Path, lost: threading.Event) -> None:
        inputs = self._inputs(job, scratch)
        if inputs is None:
            return
        config, train, validation, golden, regression = inputs
        init = init_adapter(self.registry, job, scratch / "init") if job.init_version else None
        total_epochs, done = config.epochs, None
        latest = self.queue.latest_checkpoint(job.id)
        if latest is not None and latest.epoch < config.epochs:  # a lost worker's run goes on
            init, config = self._resume(job, latest, config, scratch / "resume")
            done = latest
        hooks = _JobHooks(self, job, lost, total_epochs, done)
        template = self.registry.get_template(job.template_id)
        out = scratch / "adapter"
        self.queue.event(job.id, f"Training {job.method} on {len(items(train))} examples for up to "
                        f"{config.epochs} epochs (batch {config.batch_size}, learning rate "
                        f"{config.learning_rate:g}, seed {config.seed})"
                        + (f", continuing {init.ref}" if init else ""))
        try:
            if job.method == "dpo":
                from trainer.dpo import train_dpo_adapter

                result = train_dpo_adapter(self.options.base_dir, template.base_model_id, template, train,
                                           config, out, init_from=init, validation=validation,
                                           hooks=hooks, golden=golden, regression=regression)
            else:
                from trainer.train import train_adapter

                result = train_adapter(self.options.base_dir, template.base_model_id, template, train,
                                       config, out, init_from=init, validation=validation, hooks=hooks,
                                       golden=golden, regression=regression)
        except GateFailedError as exc:
            if exc.report is not None:
                self._report(job, exc.report)
            failed = "; ".join(str(g) for g in exc.gates if not g.passed)
            self._fail(job, "gates_failed", f"the adapter missed its gates, nothing was published: "
                                            f"{failed}")
            return
        self._report(job, result.report)
        if not self.queue.begin_publish(job.id, self.options.name):
            return  # cancelled while the last step ran
        manifest = AdapterManifest.read(result.out_dir)  # names the job: see JobQueue.reap
        dataclasses.replace(manifest, metrics={**manifest.metrics, JOB_KEY: job.id}).write(
            result.out_dir)
        version = self.registry.push(job.tenant, job.adapter_name, result.out_dir,
                                     template_id=job.template_id)
        self.queue.succeed(job.id, self.options.name, f"{job.adapter_name}@v{version.version}")
        logger.info("job %s: published %s", job.id, version.ref)

    def _resume(self, job: Job, latest: Checkpoint, config: RunConfig,
                folder: Path) -> tuple[Any, RunConfig]:
        """Start from a checkpoint: its LoRA weights, the epochs left, and the learning rate
        the schedule had reached there, decaying as before (exact for the linear and constant
        schedules; the optimizer's moments and early stopping's patience start afresh)."""
        from trainer.loop import lr_factor
        from trainer.train import InitAdapter

        folder.mkdir(parents=True)
        for name, digest in latest.files.items():
            self.registry.store.get(digest, folder / name)  # verified against its sha256
        total_steps = max(latest.step + 1, round(latest.step / latest.epoch * config.epochs))
        rate = config.learning_rate * lr_factor(latest.step, total_steps, config.warmup_steps,
                                                config.scheduler)
        resumed = dataclasses.replace(config, epochs=config.epochs - latest.epoch, learning_rate=rate,
                                      warmup_steps=0)
        self.queue.event(job.id, f"Resuming from checkpoint {latest.id} (epoch {latest.epoch} of "
                        f"{config.epochs}, step {latest.step}) at learning rate {rate:.3g}")
        return InitAdapter(folder, f"{job.tenant}/{job.id}:{latest.id}", sha256_json(latest.files)), resumed

    def _report(self, job: Job, report: Any) -> None:
        d = report.data
        self.queue.event(job.id, f"Data: {d.read} read, {d.exact_duplicates} exact and "
                        f"{d.near_duplicates} near duplicates and {d.contaminated} contaminated "
                        f"dropped, {d.train} trained on, {d.validation} held out; "
                        f"{report.truncated} truncated", data=d.to_dict())
        if report.best_epoch != len(report.epochs):
            self.queue.event(job.id, f"Kept the weights of epoch {report.best_epoch} of "
                            f"{len(report.epochs)} (lowest validation loss)"
                            + (", stopped early" if report.stopped_early else ""))
        for gate in report.gates:
            self.queue.event(job.id, f"Gate {gate}", level="info" if gate.passed else "error",
                            data={"gate": gate.name, "passed": gate.passed, "measured": gate.measured,
                                  "comparison": gate.comparison, "threshold": gate.threshold})
        if not report.gates:
            self.queue.event(job.id, "Gates: none configured for this job")

    def checkpoint(self, job: Job, stats: EpochStats, step: int, model: Any) -> None:
        """One epoch's LoRA weights into the store, and the job's checkpoint row."""
        with tempfile.TemporaryDirectory(prefix="lgw-ckpt-", dir=self.options.scratch) as folder:
            # named by its base's id, not this machine's path (as the published adapter is)
            model.peft_config["default"].base_model_name_or_path = self.options.base_model_id
            model.save_pretrained(folder, safe_serialization=True, save_embedding_layers=False)
            files = {}
            for path in sorted(Path(folder).iterdir()):
                if path.is_file() and path.name != "README.md":
                    digest = sha256_file(path)
                    self.registry.store.put(path, digest)
                    files[path.name] = digest
        metrics = {"train_loss": stats.train_loss, "valid_loss": stats.val_loss, "epoch": stats.epoch}
        self.queue.add_checkpoint(job.id, step, stats.epoch, metrics, files)

    # -- pieces ---------------------------------------------------------------------------

    def _tenants_view(self, message: str, scratch: Path) -> str:
        """A trainer's message without this machine's paths: a job's files by the names the
        tenant gave them, the base by its id."""
        message = re.sub(re.escape(str(scratch)) + r"/[^/\s]+/", "", message)
        return message.replace(str(self.options.base_dir), self.options.base_model_id)

    def _tokenizer_once(self) -> Any:
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self.options.base_dir)
        return self._tokenizer

    def _fail(self, job: Job, code: str, message: str, param: str | None = None) -> None:
        if self.queue.fail(job.id, self.options.name, code, message, param):
            logger.info("job %s failed (%s): %s", job.id, code, message)

    @contextlib.contextmanager
    def _heartbeat(self, job: Job) -> Iterator[threading.Event]:
        """Renews the job's lease until the block ends; the event is set once the job is no
        longer this worker's (cancelled, failed, lease lost) or the worker is told to stop."""
        lost, done = threading.Event(), threading.Event()

        def beat() -> None:
            while not done.wait(self.options.heartbeat_s):
                try:
                    if not self.queue.heartbeat(job.id, self.options.name, self.options.lease_s):
                        lost.set()
                        return
                except RegistryError as exc:  # keep trying: the lease outlives a short outage
                    logger.warning("job %s: heartbeat failed: %s", job.id, exc)

        thread = threading.Thread(target=beat, name=f"heartbeat {job.id}", daemon=True)
        thread.start()
        try:
            yield lost
        finally:
            done.set()
            thread.join()


class _JobHooks(RunHooks):
    """Events, checkpoints and stops; a resumed run counts on from its checkpoint."""

    def __init__(self, worker: Worker, job: Job, lost: threading.Event, epochs: int,
                 resumed: Checkpoint | None) -> None:
        self.worker, self.job, self.lost, self.epochs = worker, job, lost, epochs
        self.epoch_offset, self.step_offset = (resumed.epoch, resumed.step) if resumed else (0, 0)
        self.started = time.monotonic()

    def step(self, step: int, total: int) -> None:
        if self.lost.is_set() or self.worker.stop.is_set():
            raise RunStopped(f"job {self.job.id} stopped at step {step} of {total}")

    def epoch(self, stats: EpochStats, step: int, model: Any) -> None:
        stats = dataclasses.replace(stats, epoch=stats.epoch + self.epoch_offset)
        step += self.step_offset
        valid = "" if stats.val_loss is None else f", validation loss={stats.val_loss:.4f}"
        self.worker.queue.event(
            self.job.id, f"Epoch {stats.epoch}/{self.epochs}: step {step}, training loss="
                         f"{stats.train_loss:.4f}{valid} ({time.monotonic() - self.started:.0f} s)",
            type="metrics", data={"step": step, "epoch": stats.epoch, "train_loss": stats.train_loss,
                                  "valid_loss": stats.val_loss})
        self.worker.checkpoint(self.job, stats, step, model)
        if self.lost.is_set() or self.worker.stop.is_set():
            raise RunStopped(f"job {self.job.id} stopped after epoch {stats.epoch}")


def run_worker(registry: Registry, options: WorkerOptions, *, once: bool = False) -> int:
    """The worker command's loop: SIGTERM or SIGINT stops it; a run in progress stops at its
    next optimizer step and goes back to the queue, to resume from its last checkpoint."""
    worker = Worker(registry, options)

    def stop(signum: int, _: Any) -> None:
        logger.info("fine-tuning worker %s: %s, stopping", options.name, signal.Signals(signum).name)
        worker.stop.set()

    previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        if once:
            while not worker.stop.is_set() and worker.run_once():
                pass
        else:
            worker.run()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    return 0


__all__ = ["Worker", "WorkerOptions", "run_worker"]
