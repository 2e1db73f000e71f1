"""The training loop: a plain, step-based, seeded and resumable PyTorch loop written as functions.

``train`` reads top to bottom: ``start`` opens the feature cache and the run folder and builds the
model, optimizer and schedule (restored from ``RUN/checkpoints/last.safetensors`` with ``resume``;
with ``init``, the model starts from a trained model's weights: fine-tuning);
``loop`` repeats ``train_step``, logs a row every ``log_every`` steps, runs ``evaluate`` on the
'val' split every ``eval_every`` steps (keeping the best checkpoint) and saves a resumable
checkpoint every ``checkpoint_every`` steps; at the end the best checkpoint is evaluated on 'test'.

Exact resumption needs no saved random streams: the data order and every random draw of step ``s``
(crops, quantizer dropout, code re-seeding) come from generators seeded by ``(seed, rank, s)``, so
the step after a resume is the step the uninterrupted run would have taken.

Under ``torchrun`` each process trains on its own shard of every epoch's permutation, gradients are
averaged by DistributedDataParallel, the quantizers all-reduce their statistics, and only rank 0
writes files.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel

from vqkit.checkpoint import ENCODER_ONLY, Checkpoint, load_checkpoint, save_checkpoint
from vqkit.config import Config, config_to_dict, replace
from vqkit.data.cache import FeatureCache
from vqkit.data.dataset import SegmentDataset, make_normaliser
from vqkit.errors import VqkitError
from vqkit.files import check_output, remove_temporaries, write_json
from vqkit.limits import check_threads
from vqkit.nn.codebook import Codebook
from vqkit.nn.model import Autoencoder, build_model
from vqkit.run import RunFolder, resolve_model
from vqkit.train.distributed import Distributed, batch_indices, init_distributed, step_seed
from vqkit.train.log import MetricsLog, StopOnInterrupt, Throughput, plot_losses, progress
from vqkit.train.losses import LossWeights, reconstruction_loss
from vqkit.train.validate import eval_frames, evaluate

# train keys a resumed run may change; everything else must match the run's saved config.
RESUMABLE_CHANGES = ("steps", "log_every", "eval_every", "checkpoint_every", "eval_batches")
RESUMABLE_CHANGES += ("device", "threads")
BEST_METRIC = "objective"  # validation loss on normalised features, weighted as in training


@dataclass
class TrainResult:
    """What a finished run leaves: the trained model (unwrapped, eval mode) and its last rows."""

    model: Autoencoder
    run: Path
    step: int
    best: float  # best validation reconstruction loss (inf when never evaluated)
    val: dict[str, Any]  # the last validation row
    test: dict[str, Any] | None  # the best checkpoint on the test split (rank 0, when it has items)


@dataclass
class Session:
    """Everything one training process works with; ``step`` and ``best`` advance as it trains."""

    config: Config
    cache: FeatureCache
    run: Path
    dist: Distributed
    model: Autoencoder
    net: torch.nn.Module  # the model, or its DistributedDataParallel wrapper
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    in_shape: tuple[int, ...]
    log: MetricsLog | None  # rank 0 only
    weights: LossWeights  # the loss weight of each error (train.high_band_weight, ...)
    init: str | None  # the model id of the weights it started from (fine-tuning), else None
    step: int = 0
    best: float = math.inf


def train(
    config: Config,
    *,
    data: str | os.PathLike,
    run: str | os.PathLike,
    resume: bool = False,
    init: str | os.PathLike | None = None,
) -> TrainResult:
    """Train ``config``'s model on the feature cache ``data``, writing into the folder ``run``,
    from fresh weights or, with ``init``, from the weights of that model (a shipped name, a run
    or a checkpoint; see :func:`initial_weights`).

    Under ``torchrun`` (RANK, WORLD_SIZE, LOCAL_RANK set) this joins the process group first.
    Ctrl-C (or SIGTERM) saves ``last`` after the current step, then raises KeyboardInterrupt
    (:class:`vqkit.errors.Interrupted` naming the signal).
    Torch runs on the caller's threads (``vqkit train`` applies ``train.threads``).
    """
    check_output(run, data)
    if resume and init is not None:
        raise VqkitError("--init starts a run and --resume continues one: pass only one of them")
    if config.train.threads > 0:
        check_threads(config.train.threads, "train.threads")
    dist = init_distributed(config.train.device)
    try:
        session = start(config, Path(data), Path(run), resume, dist, init)
        val_row = loop(session)
        test_row = evaluate_best_on_test(session)
        model = session.model.eval()
        return TrainResult(model, session.run, session.step, session.best, val_row, test_row)
    finally:
        dist.close()


def start(
    config: Config,
    data: Path,
    run: Path,
    resume: bool,
    dist: Distributed,
    init: str | os.PathLike | None = None,
) -> Session:
    """Open the cache and the run folder; build (or restore) the model, optimizer and schedule."""
    cache = FeatureCache(data)
    config = resolve_config(config, cache)
    checkpoint = open_run(run, config, resume)
    if checkpoint is not None and dist.is_main:  # half-written files of a killed run
        for folder in (run, RunFolder(run).checkpoints):
            remove_temporaries(folder)
    tc = config.train
    n_train, n_val = len(cache.items("train")), len(cache.items("val"))
    if n_train < dist.world_size or n_val == 0:
        raise VqkitError(
            f"{data} has {n_train} training and {n_val} validation items; need at least "
            f"{dist.world_size} and 1 (see data.val_fraction)"
        )
    first = SegmentDataset(cache, "train", tc.segment_frames, train=False)[0]
    in_shape = input_shape(config, first)
    torch.manual_seed(tc.seed)  # the same initial weights on every rank
    model = build_model(config, in_shape)
    # the model carries the very normaliser its data goes through (saved in its state dict)
    model.normaliser.load_state_dict(make_normaliser(cache).state_dict())
    init_id = None if init is None else initial_weights(model, init, config)
    model = model.to(dist.device)
    optimizer = make_optimizer(model, config)
    scheduler = make_scheduler(optimizer, config)
    log = MetricsLog(RunFolder(run).metrics, keep_until=0) if dist.is_main else None
    net = wrap_model(model, config, dist)
    weights = LossWeights(config, model.normaliser)
    session = Session(
        config, cache, run, dist, model, net, optimizer, scheduler, in_shape, log, weights, init_id
    )
    if checkpoint is not None:
        restore(session, checkpoint)
    if dist.is_main:
        write_json(RunFolder(run).config, config_to_dict(config))
    return session


def loop(s: Session) -> dict[str, Any]:
    """Train from ``s.step`` to ``train.steps``; returns the last validation row."""
    tc = s.config.train
    val_set = SegmentDataset(s.cache, "val", eval_frames(s.config), train=False)
    val_row: dict[str, Any] = {}
    meter = Throughput(s.dist.world_size)
    with StopOnInterrupt() as stop, progress(s.step, tc.steps, s.dist.is_main) as bar:
        while s.step < tc.steps:
            with meter.measure() as frames:
                x = training_batch(s.cache, s.step, s.config, s.dist)
                row = train_step(s.net, x, s.optimizer, s.scheduler, s.config, s.weights)
                frames.append(x.shape[0] * x.shape[-1])
            s.step += 1
            row["frames_per_s"] = meter.rate()
            bar.update(1)
            bar.set_postfix(
                loss=f"{row['loss']:.4f}", fps=f"{row['frames_per_s']:.0f}", refresh=False
            )
            if due(s.step, tc.log_every, tc.steps) and s.log is not None:
                s.log.append({"step": s.step, "split": "train", **row})
            if due(s.step, tc.eval_every, tc.steps):
                val_row = validate(s, val_set)
            if due(s.step, tc.checkpoint_every, tc.steps):
                save(s, "last")
            if s.dist.any(stop.requested):
                save(s, "last")
                raise stop.interrupted()
    return val_row


def due(step: int, every: int, steps: int) -> bool:
    """True every ``every`` steps and at the last step."""
    return step == steps or (every > 0 and step % every == 0)


def resolve_config(recipe: Config, cache: FeatureCache) -> Config:
    """The run's config: the cache's audio, features and data sections, the recipe's others."""
    made = config_to_dict(cache.config)
    return replace(recipe, audio=made["audio"], features=made["features"], data=made["data"])


def open_run(run: Path, config: Config, resume: bool) -> Checkpoint | None:
    """Check the run folder against ``resume``; return the checkpoint to resume from, if any."""
    last = RunFolder(run).checkpoint("last")
    existing = [p for p in (last, RunFolder(run).checkpoint("best")) if p.exists()]
    if not resume:
        if existing:
            raise VqkitError(
                f"{run} already holds a checkpoint ({existing[0].name}); pass --resume to continue "
                "that run or choose a new --run folder"
            )
        return None
    if not last.exists():
        raise VqkitError(f"cannot resume: {last} does not exist (start the run without --resume)")
    checkpoint = load_checkpoint(last)
    if checkpoint.optimizer is None or checkpoint.scheduler is None:
        raise VqkitError(f"cannot resume: {last} has no optimizer state")
    changed = config_changes(checkpoint.config, config)
    if changed:
        raise VqkitError(
            f"cannot resume {run} with a different config: {'; '.join(changed[:4])} "
            f"(only train.{', train.'.join(RESUMABLE_CHANGES)} may change)"
        )
    return checkpoint


def config_changes(saved: Config, new: Config, sections: tuple[str, ...] = ()) -> list[str]:
    """Keys that differ between two configs, except the ones a resumed run may change; with
    ``sections``, only those sections' keys, except the ones that steer the encoder only."""
    old, now = config_to_dict(saved), config_to_dict(new)
    return [
        f"{section}.{key} {old[section][key]!r} -> {now[section][key]!r}"
        for section in sections or old
        for key in old[section]
        if old[section][key] != now[section][key]
        and not (section == "train" and key in RESUMABLE_CHANGES)
        and not (sections and (section, key) in ENCODER_ONLY)
    ]


def initial_weights(model: Autoencoder, init: str | os.PathLike, config: Config) -> str:
    """Fill ``model`` with the weights of the model ``init`` names, which must be the model
    ``config`` builds; returns its model id. Its normaliser comes along (the weights fit its
    statistics, not the cache's) and its codebooks learn afresh from its code vectors."""
    checkpoint = load_checkpoint(resolve_model(init))
    rates = checkpoint.config.audio.sample_rate, config.audio.sample_rate
    changed = [f"audio.sample_rate {rates[0]} -> {rates[1]}"] if rates[0] != rates[1] else []
    changed += config_changes(checkpoint.config, config, ("features", "model", "bottleneck"))
    if changed:
        raise VqkitError(
            f"cannot start from {init}: it is another model than this recipe and cache make "
            f"({'; '.join(changed[:4])})"
        )
    model.load_state_dict(checkpoint.model.state_dict())
    for codebook in model.modules():
        if isinstance(codebook, Codebook):
            codebook.restart()
    return checkpoint.model_id


def input_shape(config: Config, x: Tensor) -> tuple[int, ...]:
    """The model's ``in_shape``: ``(C, H, W)`` for images, ``(F,)`` for spectrograms ``(F, N)``."""
    return tuple(x.shape) if config.features.kind == "image" else tuple(x.shape[:-1])


def make_optimizer(model: torch.nn.Module, config: Config) -> torch.optim.Optimizer:
    tc = config.train
    return torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)


def make_scheduler(
    optimizer: torch.optim.Optimizer, config: Config
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over ``warmup_steps``, then cosine decay to zero at ``steps``."""
    warmup, steps = config.train.warmup_steps, config.train.steps

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min((step - warmup) / max(steps - warmup, 1), 1.0)
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def restore(s: Session, checkpoint: Checkpoint) -> None:
    """Load a resumable checkpoint into the session: weights, optimizer, schedule, step, best."""
    s.model.load_state_dict(checkpoint.model.state_dict())
    s.optimizer.load_state_dict(checkpoint.optimizer)
    s.scheduler.load_state_dict(checkpoint.scheduler)
    s.step = int(checkpoint.meta["step"])
    s.init = checkpoint.meta.get("init")
    best = checkpoint.meta.get("best")
    same_metric = checkpoint.meta.get("best_metric") == f"val/{BEST_METRIC}"
    s.best = math.inf if best is None or not same_metric else float(best)
    if s.log is not None:  # drop rows an interrupted run logged after its last checkpoint
        s.log = MetricsLog(RunFolder(s.run).metrics, keep_until=s.step)


def wrap_model(model: torch.nn.Module, config: Config, dist: Distributed) -> torch.nn.Module:
    """DistributedDataParallel when several processes train, else the model itself.

    Buffers are synced once at start but not broadcast from rank 0 at every step: the quantizers
    all-reduce their own statistics, and a replica that drifted must show up as a difference
    rather than be silently overwritten. Quantizer dropout leaves later stages unused in some
    steps, which DDP must be told about.
    """
    if not dist.enabled:
        return model
    return DistributedDataParallel(
        model,
        device_ids=[dist.device.index] if dist.device.type == "cuda" else None,
        forward_sync_buffers=False,
        find_unused_parameters=config.bottleneck.quantizer_dropout > 0,
    )


def training_batch(cache: FeatureCache, step: int, config: Config, dist: Distributed) -> Tensor:
    """The batch of ``step`` on this rank ``(B, F, segment_frames)``; seeds torch for the step.

    The items come from :func:`batch_indices`, the random crops from a dataset seeded for the
    step, so neither depends on what ran before.
    """
    tc = config.train
    seed = step_seed(tc.seed, dist.rank, step)
    torch.manual_seed(seed)  # quantizer dropout, k-means init and dead-code re-seeding
    crops = SegmentDataset(
        cache,
        "train",
        tc.segment_frames,
        True,
        seed,
        tc.augment,
        tc.augment_reverb,
        tc.augment_noise,
        tc.augment_warp,
    )
    indices = batch_indices(step, len(crops), tc.batch_size, tc.seed, dist.rank, dist.world_size)
    return torch.stack([crops[i] for i in indices]).to(dist.device, non_blocking=True)


def train_step(
    model: torch.nn.Module,
    x: Tensor,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    config: Config,
    weights: LossWeights | None = None,
) -> dict[str, float]:
    """One optimisation step on the batch ``x``, the loss weighting its errors by ``weights``;
    returns the losses and bottleneck stats."""
    model.train()
    out = model(x)
    weight = None if weights is None else weights(x, out.x_hat)
    recon = reconstruction_loss(out.x_hat, x, config.train.recon_loss, weight)
    loss = recon + out.bottleneck.loss
    if not torch.isfinite(loss):
        raise VqkitError(f"training diverged: loss is {loss.item()} (lower train.lr?)")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    clip = config.train.grad_clip if config.train.grad_clip > 0 else math.inf
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    lr = optimizer.param_groups[0]["lr"]
    optimizer.step()
    scheduler.step()
    return {
        "loss": loss.item(),
        "recon": recon.item(),
        "aux": out.bottleneck.loss.item(),
        "grad_norm": grad_norm.item(),
        "lr": lr,
        **{k: float(v) for k, v in out.bottleneck.stats.items()},
    }


def validate(s: Session, val_set: SegmentDataset) -> dict[str, Any]:
    """Evaluate on 'val', keep the best checkpoint, log the row and redraw the loss plot."""
    row = evaluate(s.model, val_set, s.config, s.dist.device)
    if row[BEST_METRIC] < s.best:
        s.best = row[BEST_METRIC]
        save(s, "best")
    if s.log is not None:
        s.log.append({"step": s.step, "split": "val", **row})
        plot_losses(s.log.rows, RunFolder(s.run).loss_plot)
    return row


def save(s: Session, name: str) -> None:
    """Save ``RUN/checkpoints/{name}.safetensors`` on rank 0; only ``last`` keeps the optimizer."""
    if not s.dist.is_main:
        return
    meta = {
        "step": s.step,
        "best": s.best if math.isfinite(s.best) else None,
        "best_metric": f"val/{BEST_METRIC}",
        "in_shape": list(s.in_shape),
        "world_size": s.dist.world_size,
    }
    if s.init is not None:
        meta["init"] = s.init
    resumable = name == "last"
    save_checkpoint(
        RunFolder(s.run).checkpoint(name),
        s.model,
        s.config,
        meta=meta,
        optimizer=s.optimizer if resumable else None,
        scheduler=s.scheduler if resumable else None,
    )


def evaluate_best_on_test(s: Session) -> dict[str, Any] | None:
    """Evaluate ``RUN/checkpoints/best.safetensors`` on the 'test' split and log it (rank 0)."""
    best_path = RunFolder(s.run).checkpoint("best")
    if not s.dist.is_main or not best_path.exists() or not s.cache.items("test"):
        return None
    test_set = SegmentDataset(s.cache, "test", eval_frames(s.config), train=False)
    best = load_checkpoint(best_path, map_location=str(s.dist.device))
    row = evaluate(best.model.to(s.dist.device), test_set, s.config, s.dist.device)
    row = {"step": best.meta["step"], "split": "test", **row}
    if s.log is not None:
        s.log.append(row)
    return row
