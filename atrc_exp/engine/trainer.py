"""The Accelerate training loop (``mode=distill``): SGD + poly LR, validation, checkpoints, logging.

``fit(cfg, run_dir)`` runs one job on every process of a launch and returns the final validation
metrics (identical on every rank). Only the main process writes files and logs remotely.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import multiprocessing
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedDataParallelKwargs, set_seed
from omegaconf import DictConfig, OmegaConf, open_dict
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from ..config import ConfigError, validate_config
from ..data import build_datasets, normal_centroids, prepare_data
from ..losses import MultiTaskLoss
from ..metrics import MultiTaskMetrics
from ..models import build_model
from ..models.genotype import GENOTYPE_FILENAME, save_genotype
from ..visualize import colorize, postprocess
from .checkpoint import load_checkpoint, resolve_resume, save_checkpoint, truncate_logs, write_json_atomic
from .fast_paths import apply_fast_paths, channels_last_enabled, prepare_input, train_loader_kwargs
from .faults import (
    FaultInjector,
    NonFiniteError,
    Preempted,
    PreemptionGuard,
    any_nonfinite,
    nonfinite_grad_params,
)
from .loggers import build_logger
from .sampling import SeededAugmentation, StepBatchSampler
from .search import SearchController, split_parameters

log = logging.getLogger(__name__)


def poly_lambda(max_steps: int, power: float):
    """LR factor (1 − step/max_steps)^power, 0 past the end."""
    return lambda step: max(0.0, 1.0 - step / max(1, max_steps)) ** power


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


#: the fused CPU kernels with an ``ops.<name>.backend`` switch: name -> extension kind
CPU_KERNEL_OPS = {
    "batch_norm": "bn_cpp",
    "upsample_cross_entropy": "ce_cpp",
    "label_attention": "label_cpp",
    "upsample_add": "ups_cpp",
}


def check_cpu_kernel_backend(op: str, backend: str) -> None:
    """Select the backend (auto | cpp | torch) of the fused CPU kernel ``op`` (a key of
    :data:`CPU_KERNEL_OPS`); a forced ``cpp`` one must build here and now."""
    import importlib

    from ..ops import build

    module = importlib.import_module(f"atrc_exp.ops.{op}")
    if backend == "cpp":
        try:
            build.get_extension(CPU_KERNEL_OPS[op])
        except build.ExtensionBuildError as e:
            raise ConfigError(
                f"ops.{op}.backend=cpp is forced but its kernel is unavailable ({e}); install a "
                f"C++ compiler (g++) or use ops.{op}.backend=auto"
            ) from e
    try:
        module.set_backend(backend)
    except ValueError as e:  # the switch's own check of the name
        raise ConfigError(f"ops.{op}.backend={backend}: {e}") from e


def check_cpu_kernel_backends(cfg: DictConfig) -> None:
    """:func:`check_cpu_kernel_backend` for every op of :data:`CPU_KERNEL_OPS` from ``cfg.ops``
    (``auto`` where unset)."""
    for op in CPU_KERNEL_OPS:
        check_cpu_kernel_backend(op, str(OmegaConf.select(cfg, f"ops.{op}.backend", default="auto")))


def _worker_init(_: int) -> None:
    """DataLoader workers leave SIGTERM/SIGUSR1 to the main process, which checkpoints first."""
    import signal

    for sig in (signal.SIGTERM, getattr(signal, "SIGUSR1", None)):
        if sig is not None:
            signal.signal(sig, signal.SIG_IGN)


def worker_start_context(num_workers: int) -> multiprocessing.context.BaseContext | None:
    """The ``multiprocessing_context`` of a DataLoader with ``num_workers`` workers.

    ``None`` (multiprocessing's default start method: ``fork`` on Linux, no pickling of the
    dataset) unless this process's default was switched to a start method multiprocessing does
    not know: a job of Hydra's joblib launcher runs in a worker of joblib's ``loky`` backend,
    which makes ``loky`` the default, and loky can only start its own ``LokyProcess`` objects
    (``'Process' object has no attribute 'env'`` for DataLoader workers). There the platform's
    standard default (the first of ``multiprocessing.get_all_start_methods()``) is used."""
    if num_workers <= 0:
        return None
    standard = multiprocessing.get_all_start_methods()
    if multiprocessing.get_start_method(allow_none=True) in (None, *standard):
        return None
    return multiprocessing.get_context(standard[0])


@contextlib.contextmanager
def workers_shut_down(iterator) -> Iterator[None]:
    """Shut the DataLoader workers of ``iterator`` down when the block ends, however it ends.

    Needed because the workers ignore SIGTERM (:func:`_worker_init`): an iterator kept alive by an
    exception's traceback (a failed sweep job, a test) would otherwise leave workers that
    multiprocessing's exit handler can neither terminate nor join, and the process would hang
    at exit."""
    try:
        yield
    finally:
        shutdown = getattr(iterator, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()


def reset_accelerate_state() -> None:
    """Forget the process-wide Accelerate singletons (between Hydra multirun jobs and tests)."""
    AcceleratorState._reset_state(reset_partial_state=True)


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def build_train_loader(dataset, cfg: DictConfig, acc: Accelerator, start_step: int = 0) -> DataLoader:
    """An endless loader of this process's training batches from global step ``start_step`` on
    (see :mod:`atrc_exp.engine.sampling`: the data of step k depends only on the seed and k)."""
    tc = cfg.trainer
    sampler = StepBatchSampler(
        len(dataset),
        int(tc.batch_size),
        seed=int(cfg.seed),
        start_step=start_step,
        rank=acc.process_index,
        world_size=acc.num_processes,
    )
    kwargs = train_loader_kwargs(tc, acc.device)  # num_workers, pin_memory, prefetch_factor, ...
    # one iterator for the whole run, so workers live as long as the run (persistent by design)
    return DataLoader(
        SeededAugmentation(dataset, int(cfg.seed)),
        batch_sampler=sampler,
        generator=torch.Generator(),  # leaves the global RNG stream alone
        worker_init_fn=_worker_init,
        multiprocessing_context=worker_start_context(kwargs["num_workers"]),
        **kwargs,
    )


def _describe_nonfinite(step: int, loss_ok: bool, terms: dict, model) -> str:
    if not loss_ok:
        bad = [k for k, v in terms.items() if not bool(torch.isfinite(v))]
        return f"non-finite loss at step {step} (terms: {', '.join(bad) or 'total'})"
    names = nonfinite_grad_params(model)
    return f"non-finite gradient at step {step} (parameters: {', '.join(names) or '?'})"


def build_val_loader(dataset, cfg: DictConfig, acc: Accelerator) -> DataLoader:
    """Shard ``dataset`` over processes without padding (every sample counted exactly once)."""
    shard = Subset(dataset, list(range(acc.process_index, len(dataset), acc.num_processes)))
    per_proc = max(1, int(cfg.trainer.val_batch_size) // acc.num_processes)
    return DataLoader(
        shard,
        batch_size=per_proc,
        shuffle=False,
        num_workers=int(cfg.trainer.num_workers),
        pin_memory=acc.device.type == "cuda",
        worker_init_fn=_worker_init,
        multiprocessing_context=worker_start_context(int(cfg.trainer.num_workers)),
    )


@torch.no_grad()
def validate(model, loader, metrics: MultiTaskMetrics, acc: Accelerator, panel_images: int = 0):
    """Metrics over the whole split, reduced across processes; optional image panels (main rank)."""
    net = acc.unwrap_model(model)
    was_training = net.training
    net.eval()
    metrics.reset()
    panels: dict = {}
    for batch in loader:
        batch = _to_device(batch, acc.device)
        with acc.autocast():
            out = net(batch["image"])
        metrics.update(out["final"], batch)
        if panel_images and not panels:
            panels = make_panels(batch, out["final"], panel_images)
    state = metrics.state().to(acc.device)
    if acc.num_processes > 1:
        state = acc.reduce(state, reduction="sum")
    metrics.load_state(state.cpu())
    net.train(was_training)
    return metrics.compute(), panels


def make_panels(batch: dict, final: dict, n: int):
    """Per task, rows of [image | ground truth | prediction] for the first ``n`` images."""
    import numpy as np

    from ..data.transforms import denormalize

    panels = {}
    n = min(n, batch["image"].shape[0])
    imgs = [denormalize(batch["image"][i]).byte().permute(1, 2, 0).cpu().numpy() for i in range(n)]
    for task, logits in final.items():
        pred = postprocess(task, logits).float().cpu().numpy()
        gt = batch[task].float().cpu().numpy()
        rows = [
            np.concatenate([imgs[i], colorize(task, gt[i], True), colorize(task, pred[i])], 1)
            for i in range(n)
        ]
        panels[task] = np.concatenate(rows, 0)
    return panels


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
        backend = OmegaConf.select(cfg, "ops.local_attention.backend", default=None)
        if backend:
            check_backend(str(backend), acc.device)
        check_cpu_kernel_backends(cfg)
        if acc.is_main_process:
            run_dir.mkdir(parents=True, exist_ok=True)
        logger = build_logger(cfg, run_dir, acc.is_main_process)
        metrics = _fit(cfg, run_dir, acc, logger)
        logger.finish(0)
        return metrics
    except BaseException:
        if logger is not None:
            logger.finish(1)
        raise
    finally:
        reset_accelerate_state()


def _fit(cfg: DictConfig, run_dir: Path, acc: Accelerator, logger) -> dict[str, float]:
    tc = cfg.trainer
    is_main = acc.is_main_process
    set_seed(int(cfg.seed))
    with acc.main_process_first():
        data_dir = prepare_data(cfg, progress=is_main)
    train_ds, val_ds = build_datasets(cfg, data_dir)
    per_proc = int(tc.batch_size) // acc.num_processes
    if len(train_ds) < per_proc * acc.num_processes:
        raise ConfigError(
            f"the train split has {len(train_ds)} samples, fewer than trainer.batch_size={tc.batch_size}"
        )

    model = build_model(cfg)
    if acc.num_processes > 1 and acc.device.type == "cuda":
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    init_from = OmegaConf.select(cfg, "trainer.init_from_original", default=None)
    if init_from:
        from ..models.original import load_original_state_dict

        trusted = bool(OmegaConf.select(cfg, "trainer.init_from_original_trusted", default=False))
        report = load_original_state_dict(model, str(init_from), weights_only=not trusted)
        log.info("initialised from original weights %s (%d tensors)", init_from, report["loaded"])
    model = apply_fast_paths(model, cfg)  # channels_last / torch.compile (trainer.*; off by default)
    channels_last = channels_last_enabled(cfg)
    tasks = list(cfg.tasks.names)
    centroids = None
    if "normals" in getattr(model.head, "aux_tasks", ()):
        with acc.main_process_first():
            centroids = normal_centroids(cfg, data_dir)
    criterion = MultiTaskLoss(
        tasks, edge_pos_weight=float(cfg.dataset.edge_pos_weight), normal_centroids=centroids
    ).to(acc.device)
    metrics = MultiTaskMetrics(
        tasks,
        int(cfg.dataset.num_semseg_classes),
        float(cfg.dataset.edge_pos_weight),
        edge_max_dist=float(OmegaConf.select(cfg, "dataset.edge_max_dist", default=0.011)),
        edge_eval_workers=int(OmegaConf.select(cfg, "trainer.edge_eval_workers", default=2)),
        edge_thresholds=OmegaConf.select(cfg, "trainer.edge_eval_thresholds", default=99),
    )
    max_steps = int(tc.max_steps)
    search = cfg.mode.name == "search"
    weights, arch = split_parameters(model)
    optimizer = torch.optim.SGD(
        weights, lr=float(tc.lr), momentum=float(tc.momentum), weight_decay=float(tc.weight_decay)
    )
    controller = arch_opt = None
    if search:
        controller = SearchController(model, cfg.mode, max_steps)
        arch_opt = torch.optim.Adam(arch, lr=float(cfg.mode.arch_lr), weight_decay=0.0)
    grad_clip = tc.grad_clip if tc.grad_clip else (cfg.mode.get("grad_clip") if search else None)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, poly_lambda(max_steps, float(tc.poly_power)))
    if search:
        model, optimizer, arch_opt = acc.prepare(model, optimizer, arch_opt)
    else:
        model, optimizer = acc.prepare(model, optimizer)
    acc.register_for_checkpointing(scheduler)
    val_loader = build_val_loader(val_ds, cfg, acc)

    n_params = sum(p.numel() for p in acc.unwrap_model(model).parameters())
    log.info(
        "run dir %s | %s on %s, %d process(es), %d parameters | train %d / val %d samples",
        run_dir,
        cfg.run_name,
        acc.device,
        acc.num_processes,
        n_params,
        len(train_ds),
        len(val_ds),
    )
    if is_main:
        (run_dir / "config_resolved.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
        genotype = getattr(acc.unwrap_model(model).head, "genotype", None)
        if genotype is not None and hasattr(logger, "log_genotype"):
            logger.log_genotype(genotype, tasks, step=0)

    step = skipped = 0
    ckpt = resolve_resume(tc.resume, run_dir)
    if ckpt is not None:
        meta = load_checkpoint(acc, ckpt)  # restores every process's RNG states too
        step, skipped = int(meta["step"]), int(meta.get("skipped_steps", 0))
        if is_main:
            truncate_logs(run_dir, step)
        log.info("resumed from %s at step %d", ckpt, step)
    # built after the RNG restore, and drawing from its own generator: the global RNG stream
    # (dropout, Gumbel noise) is the same whether or not the run was resumed
    train_loader = build_train_loader(train_ds, cfg, acc, start_step=step)

    on_nonfinite = str(OmegaConf.select(cfg, "trainer.on_nonfinite", default="stop"))
    max_skipped = int(OmegaConf.select(cfg, "trainer.max_skipped_steps", default=100))
    buffers = list(acc.unwrap_model(model).buffers())
    check_grads = acc.scaler is None  # fp16's GradScaler skips non-finite steps itself
    faults = FaultInjector()
    final_metrics: dict[str, float] = {}
    last_ckpt: Path | None = ckpt
    want_images = int(cfg.logger.get("num_images", 0)) if getattr(logger, "wants_images", False) else 0
    bar = tqdm(
        total=max_steps, initial=step, disable=not (is_main and tc.progress), desc="train", dynamic_ncols=True
    )
    it = iter(train_loader)
    model.train()
    t_last, imgs_since = time.perf_counter(), 0
    guard = PreemptionGuard()
    with guard, workers_shut_down(it):
        while step < max_steps:
            batch = _to_device(next(it), acc.device)
            faults.poison_batch(step + 1, batch)
            if on_nonfinite == "skip":  # a skipped step must not leave NaN in BatchNorm statistics
                saved_buffers = [b.detach().clone() for b in buffers]
            if search:
                entropy_w = controller.begin_step(step)
            # the loss upsamples the outputs itself (fused into the cross-entropies on the CPU)
            outputs = model(prepare_input(batch["image"], channels_last), resize=False)
            loss, terms = criterion(outputs, batch)
            if search:
                ent = controller.loss_term(entropy_w)
                terms["loss/entropy_term"] = ent.detach()
                loss = loss + ent
            faults.after_forward(step + 1)
            optimizer.zero_grad(set_to_none=True)
            if search:
                arch_opt.zero_grad(set_to_none=True)
            acc.backward(loss)
            faults.poison_grads(step + 1, model)
            grad_norm = None
            if grad_clip:
                grad_norm = acc.clip_grad_norm_(model.parameters(), float(grad_clip))
            elif check_grads:
                grad_norm = torch.nn.utils.get_total_norm(
                    [p.grad for p in model.parameters() if p.grad is not None]
                )
            loss_ok = bool(torch.isfinite(loss))
            grad_ok = grad_norm is None or bool(torch.isfinite(grad_norm))
            if any_nonfinite(acc, not (loss_ok and grad_ok)):
                what = _describe_nonfinite(step + 1, loss_ok, terms, model)
                if on_nonfinite != "skip":
                    raise NonFiniteError(
                        f"{what}; stopped (last good checkpoint: {last_ckpt or 'none'}). Lower trainer.lr, "
                        f"set trainer.grad_clip, or pass trainer.on_nonfinite=skip to skip such steps"
                    )
                skipped += 1
                log.warning("%s: step skipped (%d so far)", what, skipped)
                optimizer.zero_grad(set_to_none=True)
                if search:
                    arch_opt.zero_grad(set_to_none=True)
                with torch.no_grad():
                    for b, saved in zip(buffers, saved_buffers, strict=True):
                        b.copy_(saved)
                if skipped > max_skipped:
                    raise NonFiniteError(
                        f"{what}; {skipped} steps skipped, more than trainer.max_skipped_steps={max_skipped}"
                    )
            else:
                optimizer.step()
                if search:
                    arch_opt.step()
            with warnings.catch_warnings():  # a skipped first step warns "scheduler before optimizer"
                warnings.simplefilter("ignore", UserWarning)
                scheduler.step()
            step += 1
            imgs_since += int(tc.batch_size)
            bar.update(1)
            if step % int(tc.log_interval) == 0 or step == max_steps:
                now = time.perf_counter()
                ips = imgs_since / max(now - t_last, 1e-9)
                t_last, imgs_since = now, 0
                lr = optimizer.param_groups[0]["lr"]
                loss_v = loss.item()
                bar.set_postfix(loss=f"{loss_v:.3f}", lr=f"{lr:.2e}", img_s=f"{ips:.1f}")
                record = {
                    "train/loss": loss_v,
                    "train/lr": lr,
                    "train/images_per_s": ips,
                    **{f"train/{k}": v.item() for k, v in terms.items()},
                }
                if on_nonfinite == "skip":
                    record["train/skipped_steps"] = skipped
                if search:
                    record.update(
                        {
                            "search/tau": controller.tau_at(step - 1),
                            "search/entropy_weight": entropy_w,
                            "search/frozen_pairs": controller.num_frozen(),
                        }
                    )
                    logger.log(controller.alpha_log(), step)
                logger.log(record, step)
                if is_main:
                    with open(run_dir / "train_log.jsonl", "a") as f:
                        f.write(json.dumps({"step": step, **record}) + "\n")
                log.debug("step %d loss %.4f lr %.3e", step, loss_v, lr)
            if step % int(tc.val_interval) == 0 or step == max_steps:
                final_metrics, panels = validate(
                    model, val_loader, metrics, acc, want_images if is_main else 0
                )
                if is_main:
                    result = {"step": step, "metrics": final_metrics}
                    if on_nonfinite == "skip":
                        result["skipped_steps"] = skipped
                    write_json_atomic(run_dir / "metrics.json", result)
                    with open(run_dir / "metrics_history.jsonl", "a") as f:
                        f.write(json.dumps({"step": step, "metrics": final_metrics}) + "\n")
                    logger.log({f"val/{k}": v for k, v in final_metrics.items()}, step)
                    if search:
                        genotype = acc.unwrap_model(model).head.genotype
                        save_genotype(genotype, run_dir / GENOTYPE_FILENAME, step)
                        if hasattr(logger, "log_genotype"):
                            logger.log_genotype(genotype, tasks, step)
                    if panels:
                        logger.log_images(panels, step)
                log.info(
                    "step %d validation: %s",
                    step,
                    ", ".join(f"{k} {v:.4g}" for k, v in final_metrics.items()),
                )
            meta = {"step": step, "skipped_steps": skipped, "data": train_loader.batch_sampler.position(step)}
            if tc.checkpoint_interval and (step % int(tc.checkpoint_interval) == 0 or step == max_steps):
                last_ckpt = save_checkpoint(acc, run_dir, step, int(tc.keep_checkpoints), meta)
            if step < max_steps and guard.requested(acc):
                if last_ckpt is None or not last_ckpt.name.endswith(f"_{step:08d}"):
                    last_ckpt = save_checkpoint(acc, run_dir, step, int(tc.keep_checkpoints), meta)
                bar.close()
                guard.hand_over()
                raise Preempted(guard.signum, step, str(last_ckpt))
    bar.close()
    if not final_metrics:  # resumed at the end: validate once more
        final_metrics, _ = validate(model, val_loader, metrics, acc)
        if is_main:
            write_json_atomic(run_dir / "metrics.json", {"step": step, "metrics": final_metrics})
    acc.wait_for_everyone()
    bad = [k for k, v in final_metrics.items() if not math.isfinite(v)]
    if bad:
        log.warning("non-finite validation metrics: %s", bad)
    return final_metrics
