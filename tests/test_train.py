"""Training: the sequence format, the loss, the loop (learning, resume, early stopping, seeds)
and the --data resolution. Every model here is real and tiny, trained for a second or two."""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys

import pytest

pytest.importorskip("torch", reason="needs the export extra; the torch-free lane skips it")

import torch

from gruserve.export import train as train_module
from gruserve.export.checkpoint import load_checkpoint
from gruserve.export.config import ModelConfig
from gruserve.export.model import NRT, nrt_loss, sentence_format
from gruserve.export.synthetic import SyntheticSpec, make_synthetic_corpus
from gruserve.export.train import TrainConfig, TrainingError, train

PAD, BOS, EOS = 2, 0, 1
SMALL_SPEC = SyntheticSpec(seed=5, num_users=20, num_items=15, num_reviews=240)
FAST = TrainConfig(
    emsize=8, hidden_size=16, mlp_layers=1, max_len=15, batch_size=16, lr=1e-2,
    max_epochs=3, patience=10, seed=0, num_threads=1,
)  # fmt: skip


@pytest.fixture(scope="module")
def small_corpus():
    return make_synthetic_corpus(SMALL_SPEC)


def _weights(checkpoint):
    return checkpoint.state_dict


def _same_weights(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------- sequence format and loss


def test_sentence_format_short_is_padded():
    assert sentence_format([7, 8], max_len=4, pad=PAD, bos=BOS, eos=EOS) == [
        BOS,
        7,
        8,
        EOS,
        PAD,
        PAD,
    ]


def test_sentence_format_exact_length_has_no_pad():
    assert sentence_format([7, 8, 9], max_len=3, pad=PAD, bos=BOS, eos=EOS) == [BOS, 7, 8, 9, EOS]


def test_sentence_format_long_is_cut_to_max_len():
    seq = sentence_format(list(range(10, 30)), max_len=15, pad=PAD, bos=BOS, eos=EOS)
    assert seq == [BOS, *range(10, 25), EOS]
    assert len(seq) == 15 + 2


def test_sentence_format_empty_tip():
    assert sentence_format([], max_len=2, pad=PAD, bos=BOS, eos=EOS) == [BOS, EOS, PAD, PAD]


def test_loss_ignores_predictions_at_pad_positions():
    torch.manual_seed(0)
    log_probs = torch.log_softmax(torch.randn(2, 5, 11), dim=-1)
    target = torch.tensor([[5, 6, EOS, PAD, PAD], [7, EOS, PAD, PAD, PAD]])
    rating = torch.tensor([3.0, 4.0])
    base, nll, _ = nrt_loss(rating, rating + 1, log_probs, target, PAD, rating_weight=0.5)

    at_pad = log_probs.clone()
    at_pad[0, 3] = torch.log_softmax(torch.randn(11), dim=-1)
    at_pad[1, 2:] = -50.0
    assert nrt_loss(rating, rating + 1, at_pad, target, PAD, 0.5)[0] == base

    at_word = log_probs.clone()
    at_word[0, 1] = torch.log_softmax(torch.randn(11), dim=-1)
    assert nrt_loss(rating, rating + 1, at_word, target, PAD, 0.5)[0] != base

    # the text part is the mean over the 5 real tokens only, the rating part is weighted
    picked = log_probs.gather(-1, target.clamp(max=10).unsqueeze(-1)).squeeze(-1)
    expected = -picked[target != PAD].mean()
    assert torch.allclose(nll, expected)
    assert torch.allclose(base, expected + 0.5 * 1.0)


def test_model_loss_ignores_pad_positions_but_not_words():
    """Through the real model (input seq[:, :-1], target seq[:, 1:]): whatever the model is fed
    at positions whose target is pad changes nothing; feeding another word before a real
    target, or asking for another real target word, changes the loss."""
    torch.manual_seed(0)
    config = ModelConfig(num_users=3, num_items=3, ntoken=12, emsize=8, hidden_size=16,
                         mlp_layers=1, max_len=6)  # fmt: skip
    model = NRT(config).eval()
    user, item = torch.tensor([0, 2]), torch.tensor([1, 0])
    rating = torch.tensor([4.0, 2.0])
    seq = torch.tensor([sentence_format([5, 6], 6, PAD, BOS, EOS),
                        sentence_format([7, 8, 9, 10], 6, PAD, BOS, EOS)])  # fmt: skip
    inputs, target = seq[:, :-1], seq[:, 1:]
    assert target[0].tolist() == [5, 6, EOS, PAD, PAD, PAD, PAD]

    def loss(inp, tgt):
        pred, log_probs = model(user, item, inp)
        return nrt_loss(pred, rating, log_probs, tgt, PAD, 1.0)[0]

    base = loss(inputs, target)
    fed = inputs.clone()
    fed[0, 3:] = torch.tensor([9, 11, 4, 7])  # <eos> and the pads fed as input: targets are pad
    assert torch.equal(loss(fed, target), base)

    fed_word = inputs.clone()
    fed_word[0, 2] = 11  # the input before the real target <eos>
    assert not torch.equal(loss(fed_word, target), base)

    other_target = target.clone()
    other_target[0, 1] = 9
    assert not torch.equal(loss(inputs, other_target), base)


# ---------------------------------------------------------------- the training loop


def test_tiny_model_learns(tmp_path, small_corpus):
    checkpoint, history = train(small_corpus, dataclasses.replace(FAST, max_epochs=4), tmp_path)
    assert [h.epoch for h in history] == [1, 2, 3, 4]
    assert history[-1].train_ppl < history[0].train_ppl / 2
    assert history[-1].valid_ppl < history[0].valid_ppl
    assert history[-1].train_rating_mse < history[0].train_rating_mse
    assert (tmp_path / "best.pt").is_file() and (tmp_path / "last.pt").is_file()
    best = load_checkpoint(tmp_path / "best.pt")
    assert best.epoch == checkpoint.epoch == min(history, key=lambda h: h.valid_loss).epoch
    assert _same_weights(best.state_dict, checkpoint.state_dict)
    assert load_checkpoint(tmp_path / "last.pt").epoch == 4
    assert checkpoint.train_config == FAST.to_dict() | {"max_epochs": 4}


def test_resume_continues_exactly(tmp_path, small_corpus):
    """Epochs 1-2, then a resume for 3-4, ends with the weights of epochs 1-4 in one go:
    the optimizer state, the epoch counter and the shuffles all carry over."""
    config = dataclasses.replace(FAST, max_epochs=4)
    straight, straight_history = train(small_corpus, config, tmp_path / "straight")
    straight_last = load_checkpoint(tmp_path / "straight" / "last.pt")

    train(small_corpus, dataclasses.replace(config, max_epochs=2), tmp_path / "split")
    last = load_checkpoint(tmp_path / "split" / "last.pt")
    assert last.epoch == 2
    adam = last.optimizer_state["optimizer"]
    steps_per_epoch = -(-len(small_corpus.train) // config.batch_size)
    assert all(int(s["step"]) == 2 * steps_per_epoch for s in adam["state"].values())

    resumed, history = train(small_corpus, config, tmp_path / "split", resume=last)
    assert [h.epoch for h in history] == [1, 2, 3, 4]
    assert [h.valid_loss for h in history] == [h.valid_loss for h in straight_history]
    assert resumed.epoch == straight.epoch
    assert _same_weights(
        load_checkpoint(tmp_path / "split" / "last.pt").state_dict, straight_last.state_dict
    )
    assert _same_weights(resumed.state_dict, straight.state_dict)


def test_resume_without_optimizer_state_differs(tmp_path, small_corpus):
    """The exact-resume test above would pass vacuously if Adam's state did not matter."""
    config = dataclasses.replace(FAST, max_epochs=3)
    train(small_corpus, config, tmp_path / "straight")
    train(small_corpus, dataclasses.replace(config, max_epochs=2), tmp_path / "split")
    last = load_checkpoint(tmp_path / "split" / "last.pt")
    last.optimizer_state = None
    train(small_corpus, config, tmp_path / "split", resume=last)
    assert not _same_weights(
        load_checkpoint(tmp_path / "split" / "last.pt").state_dict,
        load_checkpoint(tmp_path / "straight" / "last.pt").state_dict,
    )


def _scripted_validation(monkeypatch, losses):
    """Real training, but validation reports the given text NLLs in turn (rating mse 0)."""
    real = train_module.run_epoch
    script = iter(losses)

    def run_epoch(model, data, pad_id, rating_weight, batch_size, optimizer, *args, **kwargs):
        if optimizer is not None:
            return real(model, data, pad_id, rating_weight, batch_size, optimizer, *args, **kwargs)
        return next(script), 0.0

    monkeypatch.setattr(train_module, "run_epoch", run_epoch)


def test_early_stopping_stops_and_keeps_the_best(tmp_path, small_corpus, monkeypatch):
    _scripted_validation(monkeypatch, [3.0, 2.0, 2.5, 2.1, 1.0, 0.5])
    config = dataclasses.replace(FAST, max_epochs=10, patience=2)
    best, history = train(small_corpus, config, tmp_path)
    assert [h.epoch for h in history] == [1, 2, 3, 4]  # 2 epochs without improvement
    assert best.epoch == 2 and best.best_valid_loss == 2.0
    on_disk = load_checkpoint(tmp_path / "best.pt")
    assert on_disk.epoch == 2
    # the returned best is a snapshot: Adam's later in-place updates did not leak into it
    for mine, saved in zip(
        best.optimizer_state["optimizer"]["state"].values(),
        on_disk.optimizer_state["optimizer"]["state"].values(),
        strict=True,
    ):
        assert all(torch.equal(mine[key], saved[key]) for key in saved)
    last = load_checkpoint(tmp_path / "last.pt")
    assert last.epoch == 4
    assert last.optimizer_state["epochs_without_improvement"] == 2


def test_early_stopping_counter_survives_resume(tmp_path, small_corpus, monkeypatch):
    _scripted_validation(monkeypatch, [3.0, 2.0, 2.5, 2.6, 2.7])
    config = dataclasses.replace(FAST, max_epochs=10, patience=2)
    train(small_corpus, dataclasses.replace(config, max_epochs=3), tmp_path)  # 1 stale epoch
    last = load_checkpoint(tmp_path / "last.pt")
    best, history = train(small_corpus, config, tmp_path, resume=last)
    assert [h.epoch for h in history] == [1, 2, 3, 4]  # one more bad epoch, then stop
    assert best.epoch == 2 and load_checkpoint(tmp_path / "best.pt").epoch == 2


def test_resuming_an_early_stopped_run_says_what_to_raise(tmp_path, small_corpus, monkeypatch):
    _scripted_validation(monkeypatch, [3.0, 2.0, 2.5, 2.6, 1.5, 1.4, 1.6, 1.7, 1.8])
    config = dataclasses.replace(FAST, max_epochs=10, patience=2)
    train(small_corpus, config, tmp_path)  # stops after epoch 4: 2 epochs without improvement
    last = load_checkpoint(tmp_path / "last.pt")
    assert last.epoch == 4
    longer = dataclasses.replace(config, max_epochs=40)
    with pytest.raises(TrainingError, match=r"stopped early.*resume with --patience 3 or more"):
        train(small_corpus, longer, tmp_path, resume=last)
    # raising the patience, as the message says, trains on (and finds the better epochs)
    best, history = train(
        small_corpus, dataclasses.replace(longer, patience=3), tmp_path, resume=last
    )
    assert [h.epoch for h in history] == list(range(1, 10))  # then 3 stale epochs: stop
    assert best.epoch == 6


def test_resume_into_a_new_directory_writes_the_best(tmp_path, small_corpus, monkeypatch):
    _scripted_validation(monkeypatch, [3.0, 2.0, 2.5, 2.6])
    config = dataclasses.replace(FAST, max_epochs=10, patience=2)
    train(small_corpus, dataclasses.replace(config, max_epochs=3), tmp_path / "a")
    shutil.copy(tmp_path / "a" / "last.pt", tmp_path / "resume.pt")
    best, _ = train(
        small_corpus, config, tmp_path / "b", resume=load_checkpoint(tmp_path / "resume.pt")
    )
    # best.pt of run a was not visible: the resumed checkpoint stands in, and is written
    assert load_checkpoint(tmp_path / "b" / "best.pt").epoch == best.epoch


def test_same_seed_same_weights_other_seed_other_weights(tmp_path, small_corpus):
    config = dataclasses.replace(FAST, max_epochs=2)
    a, _ = train(small_corpus, config, tmp_path / "a")
    b, _ = train(small_corpus, config, tmp_path / "b")
    c, _ = train(small_corpus, dataclasses.replace(config, seed=1), tmp_path / "c")
    assert _same_weights(a.state_dict, b.state_dict)
    assert not _same_weights(a.state_dict, c.state_dict)


_TRAIN_IN_A_FRESH_PROCESS = """
import hashlib, sys, tempfile
from gruserve.export.synthetic import SyntheticSpec, make_synthetic_corpus
from gruserve.export.train import TrainConfig, train
spec = SyntheticSpec(seed=5, num_users=20, num_items=15, num_reviews=240)
config = TrainConfig(emsize=8, hidden_size=16, mlp_layers=1, batch_size=16, lr=1e-2,
                     max_epochs=2, seed=0, num_threads=int(sys.argv[1]))
with tempfile.TemporaryDirectory() as out:
    best, _ = train(make_synthetic_corpus(spec), config, out)
digest = hashlib.sha256()
for name, tensor in sorted(best.state_dict.items()):
    digest.update(name.encode() + tensor.numpy().tobytes())
print(digest.hexdigest())
"""


def _weights_digest(threads: int, **env: str) -> str:
    out = subprocess.run(
        [sys.executable, "-c", _TRAIN_IN_A_FRESH_PROCESS, str(threads)],
        capture_output=True, text=True, timeout=300, check=True, env={**os.environ, **env},
    )
    return out.stdout.strip()


def test_training_is_reproducible_across_processes_and_thread_counts():
    """Same seed, same machine: the same weights, bit for bit, from fresh interpreters
    (whose string hashing differs) and with 1 or 2 torch threads. What does change them is
    the CPU kernels torch picks for the machine (ATEN_CPU_CAPABILITY here stands in for a
    CPU of another kind), which is why figures differ between machines
    (docs/training.md, "Reproducibility")."""
    reference = _weights_digest(1, PYTHONHASHSEED="1")
    assert _weights_digest(2, PYTHONHASHSEED="2") == reference
    if torch.backends.cpu.get_cpu_capability() != "DEFAULT":
        assert _weights_digest(1, ATEN_CPU_CAPABILITY="default") != reference


def test_config_validation_and_round_trip():
    assert TrainConfig.from_dict(FAST.to_dict() | {"from_the_future": 1}) == FAST
    with pytest.raises(ValueError, match="device"):
        TrainConfig(device="gpu")
    with pytest.raises(ValueError, match="batch_size"):
        TrainConfig(batch_size=0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA error")
def test_cuda_without_cuda_is_a_clear_error(tmp_path, small_corpus):
    for device in ("cuda", "cuda:1"):
        with pytest.raises(TrainingError, match=f"--device {device}: .*use --device cpu"):
            train(small_corpus, dataclasses.replace(FAST, device=device), tmp_path)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA error")
def test_train_cli_takes_cuda_n_and_refuses_cuda_without_a_traceback(tmp_path, capsys):
    from gruserve.runtime.cli import main

    argv = ["train", "--out", str(tmp_path), "--max-epochs", "1", "--emsize", "8",
            "--hidden-size", "8"]
    for device in ("cuda", "cuda:1"):  # parsed (docs/training.md promises cuda:N), then
        assert main([*argv, "--device", device]) == 2  # refused: no CUDA here
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"--device {device}: " in err
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--device", "gpu"])
    assert exit_info.value.code == 2
    assert "not a device: 'gpu' (cpu, cuda or cuda:N)" in capsys.readouterr().err


def test_build_demo_checkpoint_api(tmp_path):
    """The demo's wiring, at toy sizes (the real demo trains for a minute: bench/)."""
    from gruserve.export.demo import DEMO_SPEC, DEMO_TRAIN, build_demo_checkpoint

    assert DEMO_TRAIN.max_seconds == 0  # the demo's weights must not depend on machine load
    config = dataclasses.replace(DEMO_TRAIN, emsize=8, hidden_size=16, max_epochs=1)
    path = build_demo_checkpoint(tmp_path, config=config)
    assert path == tmp_path / "best.pt"
    checkpoint = load_checkpoint(path)
    assert checkpoint.epoch == 1
    assert len(checkpoint.users) == DEMO_SPEC.num_users
    assert checkpoint.train_config == config.to_dict()
