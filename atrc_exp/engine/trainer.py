"""The Accelerate training loop: SGD + poly LR (Adam on α in search), validation, checkpoints,
logging. Every process of a launch runs :func:`fit`; only the main process writes files and logs."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import multiprocessing
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedDataParallelKwargs, set_seed
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from ..config import ConfigError, config_tasks, validate_config
from ..data import build_datasets, prepare_data, resolve_task_constants
from ..losses import MultiTaskLoss
from ..metrics import MultiTaskMetrics
from ..models import build_model
from ..models.genotype import GENOTYPE_FILENAME, save_genotype
from ..task_kinds import MeterSettings
from .checkpoint import load_checkpoint, resolve_resume, save_checkpoint, truncate_logs, write_json_atomic
from .fast_paths import apply_fast_paths, compile_step, train_loader_kwargs
from .faults import NonFiniteError, NonFiniteMonitor, Preempted, PreemptionGuard, SkipNonFinite, with_faults
from .loggers import build_logger
from .sampling import SeededAugmentation, StepBatchSampler
from .search import SearchController, split_parameters
from .step import StepParts, StepResult, make_forward_loss, train_step

log = logging.getLogger(__name__)


def make_accelerator(cfg: DictConfig) -> Accelerator:
    """An Accelerator for this job; checks that the total batch splits over the processes."""
    # search: frozen pairs skip their unused ops, which DDP must be told about
    ddp = DistributedDataParallelKwargs(find_unused_parameters=cfg.mode.name == "search")
    acc = Accelerator(
        kwargs_handlers=[ddp],
        cpu=bool(cfg.trainer.cpu),
        mixed_precision=str(cfg.trainer.mixed_precision),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    if int(cfg.trainer.batch_size) % acc.num_processes:
        raise ConfigError(
            f"trainer.batch_size={cfg.trainer.batch_size} (total over processes) is not divisible by "
            f"the {acc.num_processes} processes; use a multiple of {acc.num_processes}"
        )
    return acc


def check_backend(backend: str, device: torch.device) -> None:
    """Select the local-attention backend; a forced ``cpp``/``cuda`` one must work here and now."""
    from ..ops import build, set_backend

    if backend not in ("cpp", "cuda"):
        set_backend(backend)
        return
    want = "cuda" if device.type == "cuda" else "cpp"
    if backend != want:
        raise ConfigError(
            f"ops.local_attention.backend={backend} cannot run on this job's device ({device.type}); "
            f"use ops.local_attention.backend=auto (or {want}, or torch)"
        )
    try:
        build.get_extension(backend)
    except build.ExtensionBuildError as e:
        tool = "the CUDA toolkit (nvcc; set CUDA_HOME)" if backend == "cuda" else "a C++ compiler (g++)"
        raise ConfigError(
            f"ops.local_attention.backend={backend} is forced but its kernel is unavailable ({e}); "
            f"install {tool} or use ops.local_attention.backend=auto"
        ) from e
    set_backend(backend)


def _worker_init(_: int) -> None:
    """DataLoader workers leave SIGTERM/SIGUSR1 to the main process, which checkpoints first."""
    for sig in PreemptionGuard.signals:
        signal.signal(sig, signal.SIG_IGN)


def worker_start_context(num_workers: int) -> multiprocessing.context.BaseContext | None:
    """The ``multiprocessing_context`` of a DataLoader: ``None`` (the default start method) unless
    that is one multiprocessing does not know — ``loky`` in a job of Hydra's joblib launcher, which
    cannot start DataLoader workers — where the platform's standard one is used."""
    if num_workers <= 0:
        return None
    standard = multiprocessing.get_all_start_methods()
    if multiprocessing.get_start_method(allow_none=True) in (None, *standard):
        return None
    return multiprocessing.get_context(standard[0])


@contextlib.contextmanager
def workers_shut_down(iterator) -> Iterator[None]:
    """Shut the DataLoader workers of ``iterator`` down when the block ends, however it ends: they
    ignore SIGTERM, so an iterator kept alive by a traceback would hang the process at exit."""
    try:
        yield
    finally:
        getattr(iterator, "_shutdown_workers", lambda: None)()


def reset_accelerate_state() -> None:
    """Forget the process-wide Accelerate singletons (between multirun jobs and tests)."""
    AcceleratorState._reset_state(reset_partial_state=True)


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def build_train_loader(dataset, cfg: DictConfig, acc: Accelerator, start_step: int = 0) -> DataLoader:
    """An endless loader of this process's training batches from global step ``start_step`` on
    (:mod:`atrc_exp.engine.sampling`: the data of step k depends only on the seed and k)."""
    tc = cfg.trainer
    sampler = StepBatchSampler(
        len(dataset), int(tc.batch_size), int(cfg.seed), start_step, acc.process_index, acc.num_processes
    )
    kwargs = train_loader_kwargs(tc, acc.device)
    return DataLoader(
        SeededAugmentation(dataset, int(cfg.seed)),
        batch_sampler=sampler,
        generator=torch.Generator(),  # leaves the global RNG stream alone
        worker_init_fn=_worker_init,
        multiprocessing_context=worker_start_context(kwargs["num_workers"]),
        **kwargs,
    )


def build_val_loader(dataset, cfg: DictConfig, acc: Accelerator) -> DataLoader:
    """Shard ``dataset`` over processes without padding (every sample counted exactly once)."""
    shard = Subset(dataset, list(range(acc.process_index, len(dataset), acc.num_processes)))
    workers = int(cfg.trainer.num_workers)
    return DataLoader(
        shard,
        batch_size=max(1, int(cfg.trainer.val_batch_size) // acc.num_processes),
        num_workers=workers,
        pin_memory=acc.device.type == "cuda",
        worker_init_fn=_worker_init,
        multiprocessing_context=worker_start_context(workers),
    )


@torch.no_grad()
def validate(model, loader, metrics: MultiTaskMetrics, acc: Accelerator, on_batch=None) -> dict[str, float]:
    """The metrics of ``model`` over ``loader``, reduced across processes — the validation of
    training and of ``atrc-eval`` alike. ``on_batch(batch, final)``, if given, sees every batch
    (on the device) with the model's ``final`` outputs."""
    net = acc.unwrap_model(model)
    was_training = net.training
    net.eval()
    metrics.reset()
    for batch in loader:
        batch = _to_device(batch, acc.device)
        with acc.autocast():
            final = net(batch["image"])["final"]
        metrics.update(final, batch)
        if on_batch is not None:
            on_batch(batch, final)
    state = metrics.state().to(acc.device)
    if acc.num_processes > 1:
        state = acc.reduce(state, reduction="sum")
    metrics.load_state(state.cpu())
    net.train(was_training)
    return metrics.compute()


def make_panels(batch: dict, final: dict, n: int, tasks):
    """Per task (:class:`~atrc_exp.task_kinds.Task`), rows of [image | ground truth | prediction]
    for the first ``n`` images, coloured by the task's kind."""
    import numpy as np

    from ..data.transforms import denormalize

    panels = {}
    n = min(n, batch["image"].shape[0])
    imgs = [denormalize(batch["image"][i]).byte().permute(1, 2, 0).cpu().numpy() for i in range(n)]
    for task in tasks:
        pred = task.kind.postprocess(final[task.name]).float().cpu().numpy()
        gt = batch[task.name].float().cpu().numpy()
        rows = [np.concatenate([imgs[i], *map(task.kind.colorize, (gt[i], pred[i]))], 1) for i in range(n)]
        panels[task.name] = np.concatenate(rows, 0)
    return panels


def build_metrics(cfg: DictConfig, tasks) -> MultiTaskMetrics:
    """The validation metrics of ``tasks`` with the settings of ``cfg.trainer`` (training and
    ``atrc-eval`` alike)."""
    tc = cfg.trainer
    return MultiTaskMetrics(tasks, MeterSettings(int(tc.edge_eval_workers), tc.edge_eval_thresholds))


def fit(cfg: DictConfig, run_dir: str | Path) -> dict[str, float]:
    """Train and validate the configured model; write ``metrics.json`` and checkpoints in ``run_dir``."""
    run_dir = Path(run_dir)
    cfg = cfg.copy()
    with open_dict(cfg):
        cfg.paths.output_dir = str(run_dir)
    validate_config(cfg)
    logger = None
    try:
        acc = make_accelerator(cfg)
        check_backend(str(cfg.ops.local_attention.backend), acc.device)
        if acc.is_main_process:
            run_dir.mkdir(parents=True, exist_ok=True)
        logger = build_logger(cfg, run_dir, acc.is_main_process)
        metrics = train(setup(cfg, run_dir, acc, logger))
        logger.finish(0)
        return metrics
    except BaseException:
        if logger is not None:
            logger.finish(1)
        raise
    finally:
        reset_accelerate_state()


def grad_clip_of(cfg: DictConfig) -> float | None:
    """The gradient-norm clipping a run applies: ``trainer.grad_clip``, else the search's
    ``mode.grad_clip``; ``None``: no clipping."""
    clip = cfg.trainer.grad_clip or (cfg.mode.grad_clip if cfg.mode.name == "search" else None)
    return float(clip) if clip else None


def convert_batchnorm(model: nn.Module, acc: Accelerator) -> nn.Module:
    """BatchNorm → SyncBatchNorm when several processes train on CUDA (as the original's SyncBN);
    SyncBatchNorm needs GPUs, so CPU processes (gloo) normalise over their own share, as logged."""
    if acc.num_processes > 1:
        if acc.device.type == "cuda":
            return nn.SyncBatchNorm.convert_sync_batchnorm(model)
        log.info(
            "%d CPU processes: BatchNorm statistics are per process (SyncBatchNorm needs CUDA)",
            acc.num_processes,
        )
    return model


def build_data(cfg: DictConfig, acc: Accelerator) -> tuple[Dataset, Dataset, Path]:
    """The train and validation datasets and the data folder (prepared by the main process first)."""
    with acc.main_process_first():
        data_dir = prepare_data(cfg, progress=acc.is_main_process)
    train_ds, val_ds = build_datasets(cfg, data_dir)
    if len(train_ds) < int(cfg.trainer.batch_size):
        raise ConfigError(
            f"the train split has {len(train_ds)} samples, fewer than trainer.batch_size={cfg.trainer.batch_size}"
        )
    return train_ds, val_ds, data_dir


def build_training_model(cfg: DictConfig, acc: Accelerator) -> nn.Module:
    """The configured model as training starts it: SyncBatchNorm with several GPUs, the weights of
    ``trainer.init_from_original`` if set, the fast paths."""
    with acc.main_process_first():  # a pretrained backbone is downloaded once
        model = convert_batchnorm(build_model(cfg), acc)
    if cfg.trainer.init_from_original:
        from ..models.original import load_original_state_dict

        path, trusted = str(cfg.trainer.init_from_original), bool(cfg.trainer.init_from_original_trusted)
        report = load_original_state_dict(model, path, weights_only=not trusted)
        log.info("initialised from original weights %s (%d tensors)", path, report["loaded"])
    return apply_fast_paths(model, cfg)


def build_loss(cfg: DictConfig, model: nn.Module, data_dir: Path, acc: Accelerator) -> MultiTaskLoss:
    """The multi-task loss, with the constants the spec leaves to the data for the model's
    auxiliary tasks (e.g. the normals' centroids; cached on disk)."""
    tasks = config_tasks(cfg)
    aux = set(getattr(model.head, "aux_tasks", ()))
    with acc.main_process_first():
        resolved = resolve_task_constants(cfg, [t for t in tasks if t.name in aux], data_dir)
    by_name = {t.name: t for t in resolved}
    return MultiTaskLoss([by_name.get(t.name, t) for t in tasks]).to(acc.device)


def build_step(cfg: DictConfig, acc: Accelerator, model: nn.Module, criterion: nn.Module) -> StepParts:
    """The optimizers (SGD on the weights; in search, Adam on α) and the poly schedule, prepared
    with the model, and the forward+loss (compiled as ``trainer.compile`` asks)."""
    tc = cfg.trainer
    weights, arch = split_parameters(model)
    optimizer = torch.optim.SGD(
        weights, lr=float(tc.lr), momentum=float(tc.momentum), weight_decay=float(tc.weight_decay)
    )
    controller = arch_opt = None
    if cfg.mode.name == "search":
        controller = SearchController(model, cfg.mode, int(tc.max_steps))
        # fused: its step count stays a device tensor (the default reads it on the host every step)
        arch_opt = torch.optim.Adam(arch, lr=float(cfg.mode.arch_lr), weight_decay=0.0, fused=True)
    max_steps, power = max(1, int(tc.max_steps)), float(tc.poly_power)
    # poly: the LR factor (1 − step/max_steps)^power, 0 past the end
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: max(0.0, 1.0 - step / max_steps) ** power
    )
    model, optimizer, *arch_opts = acc.prepare(model, optimizer, *filter(None, [arch_opt]))
    acc.register_for_checkpointing(scheduler)
    return StepParts(
        model=model,
        forward_loss=compile_step(make_forward_loss(model, criterion, bool(tc.channels_last)), cfg),
        optimizer=optimizer,
        scheduler=scheduler,
        acc=acc,
        arch_opt=arch_opts[0] if arch_opts else None,
        controller=controller,
        grad_clip=grad_clip_of(cfg),
        check_grads=acc.scaler is None,  # fp16's GradScaler skips non-finite steps itself
    )


@dataclass
class TrainingRun:
    """Everything the loop needs, built by :func:`setup`."""

    cfg: DictConfig
    run_dir: Path
    acc: Accelerator
    logger: Any
    parts: StepParts
    metrics: MultiTaskMetrics
    train_loader: DataLoader | None
    val_loader: DataLoader
    nonfinite: NonFiniteMonitor | SkipNonFinite | None = None  # trainer.on_nonfinite: stop | skip
    step: int = 0
    last_ckpt: Path | None = None

    @property
    def model(self) -> nn.Module:
        return self.parts.model


def setup(cfg: DictConfig, run_dir: Path, acc: Accelerator, logger) -> TrainingRun:
    """Data, model, loss, metrics, optimizers and schedule; the resume from the newest complete
    checkpoint; the train loader from that step."""
    set_seed(int(cfg.seed))
    train_ds, val_ds, data_dir = build_data(cfg, acc)
    model = build_training_model(cfg, acc)
    criterion = build_loss(cfg, model, data_dir, acc)
    parts = build_step(cfg, acc, model, criterion)
    metrics = build_metrics(cfg, criterion.tasks)
    run = TrainingRun(cfg, run_dir, acc, logger, parts, metrics, None, build_val_loader(val_ds, cfg, acc))
    net = acc.unwrap_model(parts.model)
    log.info(
        "run dir %s | %s on %s, %d process(es), %d parameters | train %d / val %d samples",
        run_dir, cfg.run_name, acc.device, acc.num_processes, sum(p.numel() for p in net.parameters()),
        len(train_ds), len(val_ds),
    )  # fmt: skip
    if acc.is_main_process:
        (run_dir / "config_resolved.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
        genotype = getattr(net.head, "genotype", None)
        if genotype is not None and hasattr(logger, "log_genotype"):
            logger.log_genotype(genotype, list(cfg.tasks.names), step=0)
    ckpt = resolve_resume(cfg.trainer.resume, run_dir)
    skipped = 0
    if ckpt is not None:
        meta = load_checkpoint(acc, ckpt)  # restores every process's RNG states too
        run.step, skipped, run.last_ckpt = int(meta["step"]), int(meta.get("skipped_steps", 0)), ckpt
        if acc.is_main_process:
            truncate_logs(run_dir, run.step)
        log.info("resumed from %s at step %d", ckpt, run.step)
    if cfg.trainer.on_nonfinite == "skip":  # after the resume: it keeps the restored buffers
        run.nonfinite = SkipNonFinite(acc, parts.model, int(cfg.trainer.max_skipped_steps), skipped)
    else:
        run.nonfinite = NonFiniteMonitor(acc.device)
    # built after the RNG restore, and drawing from its own generator: the global RNG stream
    # (dropout, Gumbel noise) is the same whether or not the run was resumed
    run.train_loader = build_train_loader(train_ds, cfg, acc, start_step=run.step)
    return run


def train(run: TrainingRun) -> dict[str, float]:
    """The loop, as Accelerate's examples read: a training step (:func:`train_step`) that only
    queues device work, then — on their steps only — logging, validation, checkpointing and the
    preemption check, the places where the host reads from the device (and where a non-finite
    step is caught). ``$ATRC_FAULT_INJECT`` wraps the step (:func:`with_faults`)."""
    acc, tc = run.acc, run.cfg.trainer
    max_steps, ckpt_every = int(tc.max_steps), int(tc.checkpoint_interval)
    step_fn = with_faults(train_step)
    guard, since = PreemptionGuard(), (time.perf_counter(), run.step)
    show = acc.is_main_process and tc.progress
    bar = tqdm(total=max_steps, initial=run.step, disable=not show, desc="train", dynamic_ncols=True)
    final_metrics: dict[str, float] = {}
    it = iter(run.train_loader)
    run.model.train()
    with guard, workers_shut_down(it):
        while run.step < max_steps:
            batch = _to_device(next(it), acc.device)
            result = step_fn(run.parts, batch, run.step, run.nonfinite)
            run.step += 1
            step = run.step
            bar.update(1)
            log_now = step % int(tc.log_interval) == 0 or step == max_steps
            val_now = step % int(tc.val_interval) == 0 or step == max_steps
            ckpt_now = step % ckpt_every == 0 or step == max_steps
            if log_now or val_now or ckpt_now:
                _stop_if_nonfinite(run)
            if log_now:
                since = _log_step(run, result, bar, since)
            if val_now:
                final_metrics = _validation_step(run)
            if ckpt_now:
                _checkpoint_step(run)
            # one process alone reads a host flag; several agree through an all-reduce (a device
            # read), which happens only where the loop reads anyway
            if step < max_steps and (acc.num_processes == 1 or log_now) and guard.requested(acc):
                bar.close()
                _stop_if_nonfinite(run)
                if run.last_ckpt is None or not run.last_ckpt.name.endswith(f"_{step:08d}"):
                    _checkpoint_step(run)
                guard.hand_over()
                raise Preempted(guard.signum, step, str(run.last_ckpt))
    bar.close()
    if not final_metrics:  # max_steps=0, or resumed at the end: validate once more
        final_metrics = validate(run.model, run.val_loader, run.metrics, acc)
        if acc.is_main_process:
            write_json_atomic(run.run_dir / "metrics.json", _metrics_record(run, final_metrics))
    acc.wait_for_everyone()
    bad = [k for k, v in final_metrics.items() if not math.isfinite(v)]
    if bad:
        log.warning("non-finite validation metrics: %s", bad)
    return final_metrics


def _stop_if_nonfinite(run: TrainingRun) -> None:
    """Raise :class:`NonFiniteError` naming the first non-finite step since the run started (read
    here, at a log, validation or checkpoint step — before anything is saved)."""
    what = run.nonfinite.check(run.acc, run.model)
    if what is not None:
        raise NonFiniteError(
            f"{what}; stopped (last good checkpoint: {run.last_ckpt or 'none'}). Lower trainer.lr, "
            f"set trainer.grad_clip, or pass trainer.on_nonfinite=skip to skip such steps"
        )


def _log_step(run: TrainingRun, result: StepResult, bar, since: tuple[float, int]) -> tuple[float, int]:
    """Losses, learning rate, images/s since ``since`` (time, step) — and the search's τ, entropy
    weight, frozen pairs and α — to the progress bar, the logger and ``train_log.jsonl``; returns
    the new ``since``."""
    step, parts = run.step, run.parts
    now = time.perf_counter()
    ips = int(run.cfg.trainer.batch_size) * (step - since[1]) / max(now - since[0], 1e-9)
    lr = parts.optimizer.param_groups[0]["lr"]
    loss_v = result.loss.item()
    bar.set_postfix(loss=f"{loss_v:.3f}", lr=f"{lr:.2e}", img_s=f"{ips:.1f}")
    record = {
        "train/loss": loss_v,
        "train/lr": lr,
        "train/images_per_s": ips,
        **{f"train/{k}": v.item() for k, v in result.terms.items()},
    }
    if isinstance(run.nonfinite, SkipNonFinite):
        record["train/skipped_steps"] = run.nonfinite.skipped
    if parts.controller is not None:
        record["search/tau"] = parts.controller.tau_at(step - 1)
        record["search/entropy_weight"] = result.entropy_weight
        record["search/frozen_pairs"] = parts.controller.num_frozen()  # the host learns of new freezes
        record.update(parts.controller.alpha_log())
    run.logger.log(record, step)
    if run.acc.is_main_process:
        with open(run.run_dir / "train_log.jsonl", "a") as f:
            f.write(json.dumps({"step": step, **record}) + "\n")
    log.debug("step %d loss %.4f lr %.3e", step, loss_v, lr)
    return now, step


def _validation_step(run: TrainingRun) -> dict[str, float]:
    """Validate; on the main process write ``metrics.json`` (+ history), log, and in search write
    the genotype."""
    acc, step = run.acc, run.step
    is_main = acc.is_main_process
    n_images = int(run.cfg.logger.num_images) if is_main and getattr(run.logger, "wants_images", False) else 0
    panels: dict = {}

    def keep_panels(batch: dict, final: dict) -> None:
        if n_images and not panels:
            panels.update(make_panels(batch, final, n_images, run.metrics.task_objects))

    metrics = validate(run.model, run.val_loader, run.metrics, acc, keep_panels)
    if is_main:
        write_json_atomic(run.run_dir / "metrics.json", _metrics_record(run, metrics))
        with open(run.run_dir / "metrics_history.jsonl", "a") as f:
            f.write(json.dumps({"step": step, "metrics": metrics}) + "\n")
        run.logger.log({f"val/{k}": v for k, v in metrics.items()}, step)
        if run.parts.controller is not None:
            genotype = acc.unwrap_model(run.model).head.genotype
            save_genotype(genotype, run.run_dir / GENOTYPE_FILENAME, step)
            if hasattr(run.logger, "log_genotype"):
                run.logger.log_genotype(genotype, list(run.cfg.tasks.names), step)
        if panels:
            run.logger.log_images(panels, step)
    log.info("step %d validation: %s", step, ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
    return metrics


def _checkpoint_step(run: TrainingRun) -> None:
    """Save a resumable checkpoint of this step (the newest ``trainer.keep_checkpoints`` kept)."""
    data = run.train_loader.batch_sampler.position(run.step)
    meta = {"step": run.step, "skipped_steps": run.nonfinite.skipped, "data": data}
    run.last_ckpt = save_checkpoint(
        run.acc, run.run_dir, run.step, int(run.cfg.trainer.keep_checkpoints), meta
    )


def _metrics_record(run: TrainingRun, metrics: dict[str, float]) -> dict:
    """What ``metrics.json`` holds: the step, the metrics, how many validation images had a label
    of each task and, with ``trainer.on_nonfinite=skip``, the steps skipped."""
    record = {"step": run.step, "metrics": metrics, "labelled_images": run.metrics.labelled_images()}
    if isinstance(run.nonfinite, SkipNonFinite):
        record["skipped_steps"] = run.nonfinite.skipped
    return record
