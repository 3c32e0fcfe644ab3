"""Training: teacher forcing on the seed's sequence format, NLL (pad ignored) + rating MSE.

One epoch = one pass over the training split in shuffled mini-batches; after each epoch the
validation split decides early stopping, and the best model so far is the checkpoint.

Reproducibility and resume. All randomness of a run comes from `config.seed`:
the model's initial weights and the shuffle of epoch `e` (from `seed_torch(seed, 0)` and
`seed_torch(seed, e)`, the one place seeds are derived). So an interrupted run resumed from its
`last.pt` draws exactly the batches the uninterrupted run would have drawn, and with the
optimizer state (Adam's moments and step count), the epoch counter, the best validation
loss and the early-stopping counter restored from the checkpoint, it ends with the same
weights (bit for bit on CPU; CUDA kernels may differ in the last bits).

Where resume state lives: `Checkpoint.optimizer_state` holds a small versioned dict,
`{"format": TRAIN_STATE_FORMAT, "optimizer": <Adam state_dict>, "best_epoch": ...,
"epochs_without_improvement": ..., "history": [...]}`. A bare `torch.optim` state dict (from an
older checkpoint) is accepted too; the early-stopping counter then starts from 0.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from .checkpoint import Checkpoint, CheckpointError, load_checkpoint, save_checkpoint
from .config import ModelConfig
from .corpus import Corpus, CorpusError, Review, tokenize
from .model import NRT, nrt_loss, sentence_format
from .vocab import EntityIndex, Vocabulary

log = logging.getLogger(__name__)

TRAIN_STATE_FORMAT = "gruserve-train-state/1"
BEST_FILE = "best.pt"
LAST_FILE = "last.pt"


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run needs besides the corpus. Stored in every checkpoint."""

    emsize: int = 64
    hidden_size: int = 128
    mlp_layers: int = 4
    # words per tip (teacher forcing on [bos] + words[:max_len] + [eos])
    max_len: int = 15
    vocab_size: int = 20000
    batch_size: int = 128
    lr: float = 3e-3
    # weight of the rating MSE next to the text NLL in the loss (and in early stopping)
    rating_weight: float = 1.0
    # gradient norm clipping (0 = off); guards the GRU against exploding gradients
    clip_norm: float = 1.0
    max_epochs: int = 30
    # stop after this many epochs without a better validation loss
    patience: int = 3
    seed: int = 0
    # "cpu", "cuda" or "cuda:N"
    device: str = "cpu"
    # a wall-clock budget in seconds for the whole run (0 = none), so the demo stays bounded
    max_seconds: float = 0.0
    # CPU threads for torch (0 = torch's default)
    num_threads: int = 0

    def __post_init__(self) -> None:
        for name in ("emsize", "hidden_size", "max_len", "batch_size", "max_epochs", "patience"):
            if getattr(self, name) <= 0:
                raise ValueError(f"TrainConfig.{name} must be positive, got {getattr(self, name)}")
        for name in ("mlp_layers", "vocab_size", "num_threads"):
            if getattr(self, name) < 0:
                raise ValueError(f"TrainConfig.{name} must be >= 0, got {getattr(self, name)}")
        for name in ("rating_weight", "clip_norm", "max_seconds"):
            if getattr(self, name) < 0:
                raise ValueError(f"TrainConfig.{name} must be >= 0, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"TrainConfig.lr must be positive, got {self.lr}")
        if not re.fullmatch(r"cpu|cuda(:\d+)?", self.device):
            raise ValueError(
                f"TrainConfig.device must be 'cpu', 'cuda' or 'cuda:N', got {self.device!r}"
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Rebuild from a checkpoint's `train_config`; keys this version does not know are
        dropped with a warning (a checkpoint from a newer version still resumes)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            log.warning("TrainConfig: ignoring unknown fields %s", unknown)
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass
class EncodedSplit:
    """A split as tensors: users (N,), items (N,), ratings (N,), seqs (N, max_len + 2)."""

    users: torch.Tensor
    items: torch.Tensor
    ratings: torch.Tensor
    seqs: torch.Tensor

    def __len__(self) -> int:
        return int(self.users.size(0))


@dataclass
class EpochStats:
    epoch: int
    train_ppl: float
    train_rating_mse: float
    valid_ppl: float
    valid_rating_mse: float
    # the early-stopping criterion: valid text NLL + rating_weight * valid rating MSE
    valid_loss: float
    seconds: float

    def to_dict(self) -> dict[str, float]:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------------------------
# Data


def build_vocabularies(
    corpus: Corpus, vocab_size: int
) -> tuple[Vocabulary, EntityIndex, EntityIndex]:
    """Words come from the training split only; users and items from the whole corpus."""
    vocab = Vocabulary.build((tokenize(r.text) for r in corpus.split("train")), vocab_size)
    users = EntityIndex.build(r.user for r in corpus.reviews)
    items = EntityIndex.build(r.item for r in corpus.reviews)
    return vocab, users, items


def encode_split(
    reviews: Sequence[Review],
    vocab: Vocabulary,
    users: EntityIndex,
    items: EntityIndex,
    max_len: int,
) -> EncodedSplit:
    """Reviews as tensors. Every user and item must be in the indexes (see `known_reviews`)."""
    seqs = [
        sentence_format(
            vocab.encode(tokenize(r.text)), max_len, vocab.pad_id, vocab.bos_id, vocab.eos_id
        )
        for r in reviews
    ]
    return EncodedSplit(
        users=torch.tensor([users.index(r.user) for r in reviews], dtype=torch.int64),
        items=torch.tensor([items.index(r.item) for r in reviews], dtype=torch.int64),
        ratings=torch.tensor([r.rating for r in reviews], dtype=torch.float32),
        seqs=torch.tensor(seqs, dtype=torch.int64).reshape(len(reviews), max_len + 2),
    )


def known_reviews(
    reviews: Sequence[Review], users: EntityIndex, items: EntityIndex
) -> tuple[list[Review], list[Review]]:
    """Split reviews into (those whose user and item the model knows, the others)."""
    known, unknown = [], []
    for review in reviews:
        (known if review.user in users and review.item in items else unknown).append(review)
    return known, unknown


# --------------------------------------------------------------------------------------------
# The loop


class TrainingError(ValueError):
    """A run that cannot start as asked (a missing device, a resume with nothing left to
    do): the CLI prints it as one line, without a traceback."""


def resolve_device(name: str) -> torch.device:
    """`cpu` or `cuda[:N]`; asking for CUDA where torch has none is an error with the reason."""
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = (
                f"this torch ({torch.__version__}) is built without CUDA"
                if torch.version.cuda is None
                else f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no GPU"
            )
            raise TrainingError(f"--device {name}: {why}; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise TrainingError(
                f"--device {name}: only {torch.cuda.device_count()} GPU(s) visible "
                f"(cuda:0..cuda:{torch.cuda.device_count() - 1})"
            )
    return device


def seed_torch(seed: int, epoch: int) -> torch.Generator:
    """Seeds torch's global RNG for one epoch of a run and returns a generator with the same
    seed for the epoch's shuffle. Epoch 0 is the model's initialisation (seeded with `seed`
    itself); epoch e >= 1 depends on (seed, e) only, so a resumed run replays it exactly."""
    value = seed if epoch == 0 else seed * 1_000_003 + epoch
    torch.manual_seed(value)
    return torch.Generator().manual_seed(value)


def run_epoch(
    model: NRT,
    data: EncodedSplit,
    pad_id: int,
    rating_weight: float,
    batch_size: int,
    optimizer: torch.optim.Optimizer | None,
    generator: torch.Generator | None = None,
    desc: str = "",
    clip_norm: float = 0.0,
) -> tuple[float, float]:
    """One pass; trains when an optimizer is given. Returns (text nll per token, rating mse).

    The NLL is averaged over the non-pad target tokens of the whole split (not over batches),
    so exp() of it is the split's perplexity.
    """
    training = optimizer is not None
    model.train(training)
    device = next(model.parameters()).device
    order = torch.randperm(len(data), generator=generator) if training else torch.arange(len(data))
    total_nll = total_sq = 0.0
    num_tokens = 0
    batches = range(0, len(data), batch_size)
    with (
        torch.set_grad_enabled(training),
        tqdm(batches, desc=desc, leave=False, disable=None, unit="batch") as bar,
    ):
        for start in bar:
            idx = order[start : start + batch_size]
            user, item = data.users[idx].to(device), data.items[idx].to(device)
            rating, seq = data.ratings[idx].to(device), data.seqs[idx].to(device)
            rating_pred, log_probs = model(user, item, seq[:, :-1])
            target = seq[:, 1:]
            loss, text_nll, rating_mse = nrt_loss(
                rating_pred, rating, log_probs, target, pad_id, rating_weight
            )
            if training:
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if clip_norm > 0:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), clip_norm)
                optimizer.step()
            n = int((target != pad_id).sum())
            total_nll += text_nll.item() * n
            num_tokens += n
            total_sq += rating_mse.item() * idx.numel()
            if training:
                bar.set_postfix(ppl=f"{_ppl(total_nll / max(num_tokens, 1)):.2f}")
    return total_nll / max(num_tokens, 1), total_sq / max(len(data), 1)


def train(
    corpus: Corpus,
    config: TrainConfig,
    out_dir: Path,
    resume: Checkpoint | None = None,
) -> tuple[Checkpoint, list[EpochStats]]:
    """Trains on corpus.train, early-stops on corpus.validation, keeps the best checkpoint.

    Writes `best.pt` (the best model so far) and `last.pt` (for resume) under out_dir after
    every epoch. With `resume` (normally a `last.pt`), the vocabulary, entity maps and model
    sizes come from the checkpoint; the schedule (lr, max_epochs, patience, ...) from
    `config`, so a finished run can be extended by raising max_epochs. Returns the best
    checkpoint and the history of all epochs, the resumed ones included.
    """
    previous_threads = torch.get_num_threads()
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    try:
        return _train(corpus, config, Path(out_dir), resume)
    finally:
        if config.num_threads:
            torch.set_num_threads(previous_threads)  # leave the process as we found it


@dataclass
class _Run:
    """One training run: what it trains, and the progress a resume restores."""

    config: TrainConfig
    model_config: ModelConfig
    vocab: Vocabulary
    users: EntityIndex
    items: EntityIndex
    model: NRT
    optimizer: torch.optim.Optimizer
    train_data: EncodedSplit
    valid_data: EncodedSplit
    out_dir: Path
    next_epoch: int = 1
    best_loss: float = math.inf
    best_epoch: int = 0
    # epochs since the last improvement of the validation loss (early stopping)
    stale: int = 0
    history: list[EpochStats] = dataclasses.field(default_factory=list)
    best: Checkpoint | None = None


def _train(
    corpus: Corpus, config: TrainConfig, out_dir: Path, resume: Checkpoint | None
) -> tuple[Checkpoint, list[EpochStats]]:
    run = _start(corpus, config, Path(out_dir), resume)
    if resume is not None:
        _restore(run, resume)
    _epoch_loop(run)
    if run.best is None:
        raise RuntimeError("training produced no checkpoint (max_epochs reached before epoch 1?)")
    return run.best, run.history


def _start(corpus: Corpus, config: TrainConfig, out_dir: Path, resume: Checkpoint | None) -> _Run:
    """The vocabulary, the encoded splits and a freshly initialised model and optimizer."""
    out_dir.mkdir(parents=True, exist_ok=True)
    device = resolve_device(config.device)
    seed_torch(config.seed, epoch=0)
    if resume is not None:
        vocab, users, items = resume.vocab, resume.users, resume.items
        model_config = resume.model_config
        _warn_on_size_change(config, model_config)
    else:
        vocab, users, items = build_vocabularies(corpus, config.vocab_size)
        model_config = ModelConfig(
            num_users=len(users),
            num_items=len(items),
            ntoken=len(vocab),
            emsize=config.emsize,
            hidden_size=config.hidden_size,
            mlp_layers=config.mlp_layers,
            min_rating=float(corpus.min_rating),
            max_rating=float(corpus.max_rating),
            max_len=config.max_len,
        )
    max_len = model_config.max_len
    train_data = _encode_for_training(corpus, "train", vocab, users, items, max_len)
    valid_data = _encode_for_training(corpus, "validation", vocab, users, items, max_len)
    model = NRT(model_config).to(device)  # initial weights: from seed_torch above
    log.info(
        "training on %s: %d train / %d validation reviews, %d words, %d users, %d items, "
        "%d parameters",
        device, len(train_data), len(valid_data), len(vocab), len(users), len(items),
        sum(p.numel() for p in model.parameters()),
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    return _Run(config, model_config, vocab, users, items, model, optimizer, train_data,
                valid_data, out_dir)


def _restore(run: _Run, resume: Checkpoint) -> None:
    """Weights, Adam's state, the epoch counter, the best loss and early-stopping state."""
    run.model.load_state_dict(resume.state_dict)
    state = _read_train_state(resume)
    if state["optimizer"] is not None:
        run.optimizer.load_state_dict(state["optimizer"])
    else:
        log.warning("resume: checkpoint has no optimizer state; Adam starts afresh")
    for group in run.optimizer.param_groups:
        group["lr"] = run.config.lr  # the schedule is the caller's, as documented
    run.next_epoch = resume.epoch + 1
    run.best_loss = resume.best_valid_loss
    run.best_epoch = state["best_epoch"]
    run.stale = state["epochs_without_improvement"]
    run.history = [EpochStats(**h) for h in state["history"]]
    if run.stale >= run.config.patience and run.next_epoch <= run.config.max_epochs:
        # it would stop again before its first epoch: say what to raise instead
        raise TrainingError(
            f"the resumed run stopped early: {run.stale} epoch(s) without validation "
            f"improvement, patience {run.config.patience}; to train on, resume with "
            f"--patience {run.stale + 1} or more (and --max-epochs above {resume.epoch})"
        )
    run.best = _resumed_best(resume, run.best_epoch, run.out_dir)
    if _epoch_on_disk(run.out_dir / BEST_FILE) != run.best.epoch:
        save_checkpoint(run.best, run.out_dir / BEST_FILE)  # resuming into a new out_dir
    log.info(
        "resuming after epoch %d (best valid loss %.4f at epoch %d, %d epoch(s) without "
        "improvement)",
        resume.epoch, run.best_loss, run.best_epoch, run.stale,
    )


def _epoch_loop(run: _Run) -> None:
    config = run.config
    if run.next_epoch > config.max_epochs:
        log.info(
            "nothing to do: resumed after epoch %d, max_epochs is %d",
            run.next_epoch - 1, config.max_epochs,
        )
    started = time.monotonic()
    for epoch in range(run.next_epoch, config.max_epochs + 1):
        if run.stale >= config.patience:
            log.info("early stop: no validation improvement for %d epochs", run.stale)
            break
        if config.max_seconds and time.monotonic() - started > config.max_seconds:
            log.info("stopping: time budget of %.0fs used", config.max_seconds)
            break
        improved = _train_one_epoch(run, epoch)
        _save_checkpoints(run, epoch, improved)


def _train_one_epoch(run: _Run, epoch: int) -> bool:
    """Trains one epoch, validates, updates the early-stopping state; True if it improved."""
    config = run.config
    t0 = time.monotonic()
    shuffle = seed_torch(config.seed, epoch)  # any global-RNG use is per epoch too
    train_nll, train_mse = run_epoch(
        run.model, run.train_data, run.vocab.pad_id, config.rating_weight, config.batch_size,
        run.optimizer, shuffle, desc=f"epoch {epoch}/{config.max_epochs}",
        clip_norm=config.clip_norm,
    )
    valid_nll, valid_mse = run_epoch(
        run.model, run.valid_data, run.vocab.pad_id, config.rating_weight, config.batch_size,
        None, desc="validation",
    )
    valid_loss = valid_nll + config.rating_weight * valid_mse
    improved = valid_loss < run.best_loss
    if improved:
        run.best_loss, run.best_epoch, run.stale = valid_loss, epoch, 0
    else:
        run.stale += 1
    stats = EpochStats(
        epoch=epoch,
        train_ppl=_ppl(train_nll),
        train_rating_mse=train_mse,
        valid_ppl=_ppl(valid_nll),
        valid_rating_mse=valid_mse,
        valid_loss=valid_loss,
        seconds=time.monotonic() - t0,
    )
    run.history.append(stats)
    log.info(
        "epoch %d/%d: train ppl %.3f rating mse %.4f | valid ppl %.3f rating mse %.4f | "
        "%.1fs%s",
        epoch, config.max_epochs, stats.train_ppl, train_mse, stats.valid_ppl, valid_mse,
        stats.seconds, " | best" if improved else f" | {run.stale} without improvement",
    )
    return improved


def _save_checkpoints(run: _Run, epoch: int, improved: bool) -> None:
    """last.pt after every epoch (for resume), best.pt when the epoch improved."""
    checkpoint = Checkpoint(
        model_config=run.model_config,
        state_dict={k: v.detach().cpu().clone() for k, v in run.model.state_dict().items()},
        vocab=run.vocab,
        users=run.users,
        items=run.items,
        epoch=epoch,
        best_valid_loss=run.best_loss,
        train_config=run.config.to_dict(),
        optimizer_state={
            "format": TRAIN_STATE_FORMAT,
            # a deep CPU copy: Adam updates its tensors in place on the next step
            "optimizer": _to_cpu(run.optimizer.state_dict()),
            "best_epoch": run.best_epoch,
            "epochs_without_improvement": run.stale,
            "history": [h.to_dict() for h in run.history],
        },
    )
    save_checkpoint(checkpoint, run.out_dir / LAST_FILE)
    if improved:
        run.best = checkpoint
        save_checkpoint(checkpoint, run.out_dir / BEST_FILE)


# --------------------------------------------------------------------------------------------
# Helpers


def _ppl(nll: float) -> float:
    return math.exp(min(nll, 700.0))  # exp overflows past ~709; such a model is noise anyway


def _encode_for_training(
    corpus: Corpus,
    split: str,
    vocab: Vocabulary,
    users: EntityIndex,
    items: EntityIndex,
    max_len: int,
) -> EncodedSplit:
    reviews = corpus.split(split)
    known, unknown = known_reviews(reviews, users, items)
    if unknown:
        example = unknown[0]
        raise CorpusError(
            f"{len(unknown)} of {len(reviews)} {split} reviews have a user or item the "
            f"checkpoint does not know (e.g. user {example.user!r}, item {example.item!r}); "
            f"resume on the corpus the checkpoint was trained on"
        )
    return encode_split(known, vocab, users, items, max_len)


def _warn_on_size_change(config: TrainConfig, model_config: ModelConfig) -> None:
    for name in ("emsize", "hidden_size", "mlp_layers", "max_len"):
        if getattr(config, name) != getattr(model_config, name):
            log.info(
                "resume: %s=%s in the config is ignored; the checkpoint's model has %s=%s",
                name,
                getattr(config, name),
                name,
                getattr(model_config, name),
            )


def _read_train_state(checkpoint: Checkpoint) -> dict[str, Any]:
    state = checkpoint.optimizer_state
    if isinstance(state, dict) and state.get("format") == TRAIN_STATE_FORMAT:
        return state
    bare = isinstance(state, dict) and "param_groups" in state
    return {
        "optimizer": state if bare else None,
        "best_epoch": checkpoint.epoch,
        "epochs_without_improvement": 0,
        "history": [],
    }


def _epoch_on_disk(path: Path) -> int | None:
    try:
        return load_checkpoint(path).epoch
    except CheckpointError:
        return None


def _resumed_best(resume: Checkpoint, best_epoch: int, out_dir: Path) -> Checkpoint:
    """The best checkpoint so far: the resumed one itself, or out_dir's best.pt if it is the
    epoch the resumed run recorded as best. Without either, the resumed one stands in."""
    if best_epoch == resume.epoch:
        return resume
    path = out_dir / BEST_FILE
    try:
        candidate = load_checkpoint(path)
    except CheckpointError:
        candidate = None
    if candidate is not None and candidate.epoch == best_epoch:
        return candidate
    log.warning(
        "resume: the best epoch was %d but %s does not hold it; until a better epoch comes, "
        "the resumed checkpoint (epoch %d) is returned as the best",
        best_epoch,
        path,
        resume.epoch,
    )
    return resume


def _to_cpu(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_to_cpu(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_to_cpu(v) for v in value)
    return copy.deepcopy(value)
