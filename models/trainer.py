"""The training loop: one function with a progress callback and a cancel check, usable with or without a queue."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from models.checkpoints import (
    load_state,
    load_state_dict,
    meta_path,
    pending_path,
    save_checkpoint,
    save_state,
    tidy_checkpoints,
    weights_path,
)
from models.config import TrainConfig
from models.data import (
    ArrayDataset,
    Augment,
    DeviceLoader,
    dataset_info,
    load_cifar,
    make_dataloader,
    train_val_split,
)
from models.device import compile_unavailable, cpu_bf16_flags, resolve_device, use_bf16
from models.resnet import build_model
from models.runs import MetricsLog
from models.timelapse import Timelapse, probe_batch

_log = logging.getLogger("convlens.trainer")

Progress = Callable[[dict[str, Any]], None]
CancelCheck = Callable[[], bool]


@dataclass
class TrainResult:
    """How a training call ended, and where its outputs are."""

    status: str  # "succeeded" or "cancelled"
    epoch: int
    step: int
    best_epoch: int | None
    metrics: dict[str, Any] = field(default_factory=dict)
    best_checkpoint: Path | None = None


def _optimizer(cfg: TrainConfig, params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, betas=(cfg.momentum, 0.999), weight_decay=cfg.weight_decay)
    return torch.optim.SGD(
        params,
        lr=cfg.lr,
        momentum=cfg.momentum,
        nesterov=cfg.nesterov and cfg.momentum > 0,
        weight_decay=cfg.weight_decay,
    )


def _scheduler(cfg: TrainConfig, opt: torch.optim.Optimizer, steps_per_epoch: int) -> tuple[Any, bool]:
    """The LR schedule and whether it steps per batch (True) or per epoch (False)."""
    if cfg.schedule == "multistep":
        return torch.optim.lr_scheduler.MultiStepLR(opt, milestones=cfg.milestones, gamma=cfg.gamma), False
    if cfg.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(
            opt,
            max_lr=cfg.lr,
            total_steps=cfg.epochs * steps_per_epoch,
            pct_start=0.25,
            anneal_strategy="linear",
            div_factor=10,
            final_div_factor=100,
        ), True
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs * steps_per_epoch), True
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0), False


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    device: torch.device,
    num_classes: int,
    tta_flip: bool = False,
    bf16: bool = False,
) -> dict[str, Any]:
    """Loss, accuracy and confusion matrix (rows: true class) of a model in eval mode."""
    was_training = model.training
    model.eval()
    loss_sum, n = 0.0, 0
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    for x, y in batches:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with _autocast(device, bf16):
            logits = model(x).float()
            if tta_flip:
                logits = (logits.softmax(1) + model(x.flip(3)).float().softmax(1)).log()
        loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
        n += int(y.shape[0])
        idx = (y * num_classes + logits.argmax(1)).cpu()
        confusion += torch.bincount(idx, minlength=num_classes**2).view(num_classes, num_classes)
    model.train(was_training)
    acc = float(confusion.diag().sum()) / max(n, 1)
    return {"loss": loss_sum / max(n, 1), "acc": acc, "n": n, "confusion": confusion.tolist()}


def _autocast(device: torch.device, bf16: bool) -> contextlib.AbstractContextManager[Any]:
    """bf16 autocast where `use_bf16` chose it (CUDA; a CPU with bf16 instructions when asked), else nothing."""
    if bf16:
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _batches(
    cfg: TrainConfig,
    ds: ArrayDataset,
    device: torch.device,
    train: bool,
    gen: torch.Generator,
) -> Any:
    info = dataset_info(cfg.dataset)
    aug = Augment(crop=cfg.crop and train, flip=cfg.flip and train, resize=cfg.resize)
    bs = cfg.batch_size if train else max(cfg.batch_size, 500)
    if cfg.loader == "dataloader":
        return make_dataloader(ds, bs, info.mean, info.std, aug, shuffle=train, generator=gen)
    return DeviceLoader(ds, bs, info.mean, info.std, device, aug, shuffle=train, generator=gen)


def checkpoint_meta(
    cfg: TrainConfig, classes: list[str], epoch: int, step: int, metrics: dict[str, Any]
) -> dict[str, Any]:
    """What a serving process needs to use a checkpoint without the training code."""
    info = dataset_info(cfg.dataset)
    return {
        "arch": cfg.arch,
        "dataset": cfg.dataset,
        "num_classes": info.num_classes,
        "classes": classes,
        "mean": list(info.mean),
        "std": list(info.std),
        "input_size": cfg.resize or 32,
        "epoch": epoch,
        "step": step,
        "metrics": metrics,
        "config": cfg.model_dump(),
        "created": time.time(),
    }


class _CompiledForward:
    """The network as torch.compile runs it for the training steps (static shapes: one compile per batch shape),
    sharing the eager module's parameters, so checkpoints, evaluation and hooks keep using the eager module. A
    failed compile is logged and the steps go on eager: compiling is an optimisation, never a reason to fail."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.fn: Callable[[torch.Tensor], torch.Tensor] | None = torch.compile(model, dynamic=False)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.fn is not None:
            try:
                return self.fn(x)
            except torch._dynamo.exc.TorchDynamoException as e:  # raised before any step's work is done
                first = str(e).strip().splitlines()[0] if str(e).strip() else ""
                _log.warning("torch.compile failed (%s: %s): training steps run eager", type(e).__name__, first)
                self.fn = None
        return self.model(x)  # type: ignore[no-any-return]


def _train_forward(cfg: TrainConfig, model: nn.Module, dev: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    """What the training steps call: the compiled network when the config asks and this machine can build it."""
    if not cfg.compile:
        return model
    why = compile_unavailable(dev)
    if why:
        _log.warning("compile=true, but %s: training steps run eager", why)
        return model
    _log.info("training steps compiled with torch.compile (inductor); each new batch shape compiles once")
    return _CompiledForward(model)


@dataclass
class _Session:
    """Everything one call of `train` holds: data, model, optimiser, logs, and the counters a resume restores."""

    cfg: TrainConfig
    dev: torch.device
    bf16: bool
    channels_last: bool
    ckdir: Path
    log: MetricsLog
    writer: Any
    classes: list[str]
    num_classes: int
    train_ds: ArrayDataset
    eval_ds: ArrayDataset
    eval_name: str
    test_ds: ArrayDataset
    model: nn.Module
    train_forward: Callable[[torch.Tensor], torch.Tensor]
    gen: torch.Generator
    loader: Any
    opt: torch.optim.Optimizer
    sched: Any
    per_step: bool
    criterion: nn.Module
    progress: Progress | None
    should_cancel: CancelCheck | None
    lapse: Timelapse | None = None  # conv1 snapshots and layer statistics (models/timelapse.py)
    step: int = 0
    best_acc: float = -1.0
    best_epoch: int | None = None
    start_epoch: int = 1
    steps_done_here: int = 0
    t_start: float = field(default_factory=time.monotonic)

    @property
    def total_steps(self) -> int:
        return self.cfg.epochs * len(self.loader)

    def report(self, progress: dict[str, Any]) -> None:
        if self.progress:
            self.progress({"epochs": self.cfg.epochs, "total_steps": self.total_steps, **progress})


def train(
    cfg: TrainConfig,
    run_dir: Path,
    data_root: Path,
    device: str | torch.device = "auto",
    progress: Progress | None = None,
    should_cancel: CancelCheck | None = None,
    resume: bool = True,
    tensorboard: bool = True,
    timelapse: bool = True,
) -> TrainResult:
    """Train `cfg` into `run_dir` (checkpoints/, snapshots/, metrics.jsonl, tb/), resuming from its state.pt."""
    s = _setup(cfg, run_dir, data_root, resolve_device(device), progress, should_cancel, tensorboard)
    _restore(s, resume)
    if timelapse:
        s.lapse = _start_timelapse(s, run_dir)
    epoch = s.start_epoch - 1
    try:
        for epoch in range(s.start_epoch, cfg.epochs + 1):
            t_epoch = time.monotonic()
            train_metrics = _train_epoch(s, epoch)
            if train_metrics is None:  # cancelled mid-epoch: the last checkpoint stands
                best = s.ckdir / "best"
                return TrainResult(
                    "cancelled", epoch - 1, s.step, s.best_epoch, {}, best if meta_path(best).is_file() else None
                )
            ev = _evaluate_epoch(s, epoch)
            _end_epoch(s, epoch, train_metrics, ev, time.monotonic() - t_epoch)
    finally:
        if s.writer:
            s.writer.close()
    best = s.ckdir / "best"
    final = _final_test(cfg, s.model, best, s.test_ds, s.dev, s.gen, s.num_classes, progress, s.bf16)
    s.log.append([{"kind": "final", "step": s.step, "epoch": cfg.epochs, **final, "time": time.time()}])
    return TrainResult("succeeded", cfg.epochs, s.step, s.best_epoch, final, best)


def _setup(
    cfg: TrainConfig,
    run_dir: Path,
    data_root: Path,
    dev: torch.device,
    progress: Progress | None,
    should_cancel: CancelCheck | None,
    tensorboard: bool,
) -> _Session:
    """Data, model, optimiser and schedule for `cfg`; the checkpoint folder tidied after any killed attempt."""
    info = dataset_info(cfg.dataset)
    ckdir = run_dir / "checkpoints"
    ckdir.mkdir(parents=True, exist_ok=True)
    tidy_checkpoints(ckdir)  # saves a killed attempt left unfinished: completed if committed, else dropped
    full = load_cifar(data_root, cfg.dataset, train=True)
    if cfg.train_limit is not None:
        full = full.subset(0, min(cfg.train_limit + cfg.val_size, len(full)))
    train_ds, val_ds = train_val_split(full, cfg.val_size)
    test_ds = load_cifar(data_root, cfg.dataset, train=False)
    bf16 = use_bf16(dev, cfg.precision)
    # channels_last is what oneDNN's and cuDNN's bf16 kernels want; float32 on the CPU keeps NCHW.
    channels_last = bf16 or dev.type == "cuda"
    flags = ",".join(cpu_bf16_flags()) or "none"
    _log.info(
        "training on %s, %s (precision=%s, CPU bf16 flags: %s)", dev, "bf16" if bf16 else "fp32", cfg.precision, flags
    )
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.arch, info.num_classes).to(dev)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    gen = torch.Generator().manual_seed(cfg.seed)
    loader = _batches(cfg, train_ds, dev, True, gen)
    opt = _optimizer(cfg, model.parameters())
    sched, per_step = _scheduler(cfg, opt, len(loader))
    eval_ds, eval_name = (val_ds, "val") if val_ds is not None else (test_ds, "test")
    return _Session(
        cfg=cfg, dev=dev, bf16=bf16, channels_last=channels_last, ckdir=ckdir,
        log=MetricsLog(run_dir / "metrics.jsonl"), writer=_summary_writer(run_dir / "tb") if tensorboard else None,
        classes=full.classes, num_classes=info.num_classes, train_ds=train_ds, eval_ds=eval_ds, eval_name=eval_name,
        test_ds=test_ds, model=model, train_forward=_train_forward(cfg, model, dev), gen=gen, loader=loader,
        opt=opt, sched=sched, per_step=per_step,
        criterion=nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing), progress=progress,
        should_cancel=should_cancel,
    )  # fmt: skip


def _restore(s: _Session, resume: bool) -> None:
    """Continue from state.pt when there is one; drop log records a killed attempt wrote past its checkpoint."""
    state_path = s.ckdir / "state.pt"
    if not (resume and state_path.is_file()):
        s.log.truncate_after(0)  # a fresh start: records of an attempt killed before its first checkpoint go
        return
    st = load_state(state_path)
    load_state_dict(s.model, st["model"], str(state_path))
    s.opt.load_state_dict(st["optimizer"])
    s.sched.load_state_dict(st["scheduler"])
    s.gen.set_state(st["generator"])
    s.start_epoch, s.step = int(st["epoch"]) + 1, int(st["step"])
    s.best_acc, s.best_epoch = float(st["best_acc"]), st.get("best_epoch")
    s.log.truncate_after(s.step)


def _start_timelapse(s: _Session, run_dir: Path) -> Timelapse:
    """Snapshots and layer statistics from the restored epoch on (a fresh run: from the initialisation)."""
    probe = probe_batch(s.eval_ds, s.cfg.dataset, s.dev, s.cfg.resize, s.channels_last)
    lapse = Timelapse(s.model, run_dir, probe, lambda: _autocast(s.dev, s.bf16), s.writer)
    lapse.start(s.start_epoch - 1, s.step)
    return lapse


def _train_epoch(s: _Session, epoch: int) -> dict[str, float] | None:
    """One pass over the training split; its mean loss and accuracy, or None when cancelled."""
    s.model.train()
    loss_sum = torch.zeros((), device=s.dev)
    correct = torch.zeros((), device=s.dev, dtype=torch.int64)
    seen, window = 0, [time.monotonic(), 0]
    for x, y in s.loader:
        x, y = x.to(s.dev, non_blocking=True), y.to(s.dev, non_blocking=True)
        if s.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with _autocast(s.dev, s.bf16):
            logits = s.train_forward(x)
            loss = s.criterion(logits.float(), y)
        s.opt.zero_grad(set_to_none=True)
        loss.backward()
        s.opt.step()
        if s.per_step:
            s.sched.step()
        s.step += 1
        s.steps_done_here += 1
        bs = int(y.shape[0])
        seen += bs
        window[1] += bs
        loss_sum += loss.detach() * bs
        correct += (logits.argmax(1) == y).sum()
        if s.step % s.cfg.log_every == 0 or seen == len(s.train_ds):
            _log_step(s, epoch, loss, logits, y, window)
        if s.should_cancel and s.should_cancel():
            return None
    if not s.per_step:
        s.sched.step()
    return {"loss": float(loss_sum) / max(seen, 1), "acc": float(correct) / max(seen, 1)}


def _log_step(
    s: _Session, epoch: int, loss: torch.Tensor, logits: torch.Tensor, y: torch.Tensor, window: list[float]
) -> None:
    """A step record into metrics.jsonl, TensorBoard and the progress callback (images/s over the window)."""
    now = time.monotonic()
    ips = window[1] / max(now - window[0], 1e-9)
    window[0], window[1] = now, 0
    rec = {
        "kind": "step",
        "step": s.step,
        "epoch": epoch,
        "loss": float(loss.detach()),
        "acc": float((logits.detach().argmax(1) == y).float().mean()),
        "lr": s.opt.param_groups[0]["lr"],
        "images_per_s": ips,
        "time": time.time(),
    }
    s.log.append([rec])
    if s.lapse:
        s.lapse.observe_gradients()  # the step's gradients are still there: zero_grad comes in the next step
    if s.writer:
        s.writer.add_scalar("train/loss", rec["loss"], s.step)
        s.writer.add_scalar("train/lr", rec["lr"], s.step)
    eta = (now - s.t_start) / s.steps_done_here * (s.total_steps - s.step)
    s.report({**rec, "phase": "train", "eta_s": eta})


def _evaluate_epoch(s: _Session, epoch: int) -> dict[str, Any]:
    """The model on the validation split (the test split when none is held out)."""
    s.report({"phase": "eval", "epoch": epoch, "step": s.step})
    batches = _batches(s.cfg, s.eval_ds, s.dev, False, s.gen)
    return evaluate(s.model, batches, s.dev, s.num_classes, bf16=s.bf16)


def _end_epoch(s: _Session, epoch: int, train_metrics: dict[str, float], ev: dict[str, Any], seconds: float) -> None:
    """Checkpoint (and best), the epoch's record, the resume state, pruning, then progress: in that order."""
    rec = {
        "kind": "epoch",
        "step": s.step,
        "epoch": epoch,
        "train_loss": train_metrics["loss"],
        "train_acc": train_metrics["acc"],
        f"{s.eval_name}_loss": ev["loss"],
        f"{s.eval_name}_acc": ev["acc"],
        "lr": s.opt.param_groups[0]["lr"],
        "seconds": seconds,
        "time": time.time(),
    }
    metrics = {k: v for k, v in rec.items() if k not in ("kind", "time")}
    meta = checkpoint_meta(s.cfg, s.classes, epoch, s.step, metrics)
    save_checkpoint(s.model, s.ckdir / f"epoch-{epoch:04d}", meta)
    if ev["acc"] > s.best_acc:
        s.best_acc, s.best_epoch = ev["acc"], epoch
        save_checkpoint(s.model, s.ckdir / "best", meta)
    layers = s.lapse.end_epoch(epoch, s.step) if s.lapse else []  # conv1's snapshot and the layers' statistics
    # The epoch's records go in before the resume state: a kill in between loses them with the state (resume
    # truncates the log to its step and drops later snapshots), never keeps a state whose records are missing.
    s.log.append([*layers, {**rec, "best_epoch": s.best_epoch}])
    if s.writer:
        for k in ("train_loss", "train_acc", f"{s.eval_name}_loss", f"{s.eval_name}_acc"):
            s.writer.add_scalar(f"epoch/{k}", rec[k], epoch)
        s.writer.flush()
    _save_resume_state(s, epoch)
    _prune(s.ckdir, s.cfg.keep_last)
    s.report({**rec, "phase": "epoch", "best_epoch": s.best_epoch})


def _save_resume_state(s: _Session, epoch: int) -> None:
    """state.pt: what `_restore` needs to continue after `epoch` (tensors and plain containers only)."""
    state = {
        "model": s.model.state_dict(),
        "optimizer": s.opt.state_dict(),
        "scheduler": s.sched.state_dict(),
        "generator": s.gen.get_state(),
        "epoch": epoch,
        "step": s.step,
        "best_acc": s.best_acc,
        "best_epoch": s.best_epoch,
    }
    save_state(s.ckdir / "state.pt", state)


def _final_test(
    cfg: TrainConfig,
    model: nn.Module,
    best: Path,
    test_ds: ArrayDataset,
    dev: torch.device,
    gen: torch.Generator,
    num_classes: int,
    progress: Progress | None,
    bf16: bool = False,
) -> dict[str, Any]:
    """Report the test set once: for the final weights and for the best (by validation) checkpoint."""
    import json

    from models.checkpoints import atomic_write_json, load_weights

    if progress:
        progress({"phase": "test", "epoch": cfg.epochs})
    batches = lambda: _batches(cfg, test_ds, dev, False, gen)  # noqa: E731
    final_ev = evaluate(model, batches(), dev, num_classes, bf16=bf16)
    out: dict[str, Any] = {"final_test_acc": final_ev["acc"], "final_test_loss": final_ev["loss"]}
    if meta_path(best).is_file():
        meta = json.loads(meta_path(best).read_text())
        ev = final_ev
        if meta["epoch"] != cfg.epochs:  # the best epoch is not the last: test its weights too
            load_state_dict(model, load_weights(weights_path(best)), str(best))
            ev = evaluate(model, batches(), dev, num_classes, bf16=bf16)
        out.update(
            {"test_acc": ev["acc"], "test_loss": ev["loss"], "best_epoch": meta["epoch"], "confusion": ev["confusion"]}
        )
        if cfg.tta_flip:
            out["test_acc_tta"] = evaluate(model, batches(), dev, num_classes, tta_flip=True, bf16=bf16)["acc"]
        meta["metrics"] = {**meta.get("metrics", {}), **{k: v for k, v in out.items() if k != "confusion"}}
        meta["confusion"] = ev["confusion"]
        atomic_write_json(meta_path(best), meta)
    return out


def _prune(ckdir: Path, keep_last: int) -> None:
    """Keep the newest `keep_last` epoch checkpoints (best.* and state.pt are separate)."""
    epochs = sorted(ckdir.glob("epoch-*.safetensors"))
    for old in epochs[: max(0, len(epochs) - keep_last)]:
        old.with_suffix(".json").unlink(missing_ok=True)  # the metadata first: no listing sees half a pair
        old.unlink(missing_ok=True)
        pending_path(old).unlink(missing_ok=True)


def _summary_writer(path: Path) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional; metrics.jsonl always has everything
        return None
    return SummaryWriter(str(path))
