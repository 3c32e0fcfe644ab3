"""ORT against PyTorch: per-step figures at one batch size, and greedy decodes token for
token. Used by `verify`; every comparison lands in a `Checks` under a stable name."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import torch
from tqdm import tqdm

from gruserve.runtime.bundle import Bundle
from gruserve.runtime.providers import SessionConfig, session_options, wanted_providers
from gruserve.runtime.runner import StepRunner

from . import onnx_graphs as og
from .bundle_eval import greedy_decodes
from .model import NRT, greedy_decode, nrt_weights
from .precision import PRECISIONS, PrecisionSpec
from .verify_report import Checks, GreedyParity

# the encoder runs in float32 in every precision (see precision.py)
RATING_TOLERANCE = PRECISIONS["fp32"].hidden_tolerance
NUM_STEPS = 5
GREEDY_CHUNK = 64


def _bits(a: np.ndarray) -> np.ndarray:
    return a.view(f"u{a.itemsize}")


def _snapshot(runner: StepRunner) -> np.ndarray:
    # a copy: on the CPU provider OrtValue.numpy() is a view of the live pool buffer
    return np.array(runner.pool.numpy(), copy=True)


class PoolWatch:
    """The runner's pool as last seen: after each call, every slot not written must keep its
    exact bits. The pool is filled with random values first, so zeros cannot hide a bug."""

    def __init__(self, runner: StepRunner, rng: np.random.Generator, checks: Checks, name: str):
        self.runner, self.checks, self.name = runner, checks, name
        shape = (runner.bundle.num_layers, runner.num_slots, runner.bundle.hidden_size)
        self.host = rng.standard_normal(shape).astype(runner.pool_dtype)
        runner.pool.update_inplace(self.host)
        self.host = _snapshot(runner)

    def after(self, written: np.ndarray, where: str) -> np.ndarray:
        """Checks the untouched slots and returns the new pool (host copy)."""
        new = _snapshot(self.runner)
        keep = np.ones(self.runner.num_slots, dtype=bool)
        keep[written] = False
        changed = int(np.count_nonzero(_bits(new[:, keep]) != _bits(self.host[:, keep])))
        self.checks.value(self.name, changed, 0, where)
        self.host = new
        return new


def verify_pairs(num_users: int, num_items: int, n: int, seed: int):
    """The (user, item) index pairs greedy parity decodes: n distinct ones where the grid
    allows, a function of the seed alone, so anyone can decode the same pairs again."""
    rng = np.random.default_rng([seed, 1])
    grid = num_users * num_items
    flat = rng.choice(grid, size=n, replace=n > grid)
    return flat // num_items, flat % num_items


class VerifyGraph:
    """The verification-only step graph (full log-probs), built in memory from the model."""

    def __init__(self, model: NRT, precision: str, config: SessionConfig):
        graph = og.build_step_graph(
            nrt_weights(model), og.StepGraphOptions(with_log_probs=True, precision=precision)
        )
        self.session = ort.InferenceSession(
            graph.SerializeToString(), session_options(config), providers=wanted_providers(config)
        )

    def step(self, pool: np.ndarray, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Row b of pool is slot b; returns (pool', log_probs)."""
        rows = np.arange(pool.shape[1], dtype=np.int64)
        feeds = {og.POOL: pool, og.READ_SLOTS: rows, og.WRITE_SLOTS: rows, og.TOKENS: tokens}
        pool_out, log_probs = self.session.run([og.POOL_OUT, og.LOG_PROBS], feeds)
        return pool_out, log_probs


def _as_f32(a: np.ndarray) -> np.ndarray:
    return a.astype(np.float32)


def _argmax_gap(log_probs: torch.Tensor, chosen: np.ndarray) -> float:
    """How far below PyTorch's best the token ORT chose is (0 when they agree)."""
    picked = log_probs.gather(1, torch.as_tensor(chosen, dtype=torch.int64)[:, None])[:, 0]
    return float((log_probs.max(dim=1).values - picked).max())


def parity_at(
    batch: int, model: NRT, runner: StepRunner, vgraph: VerifyGraph, spec: PrecisionSpec,
    checks: Checks, rng: np.random.Generator, num_steps: int,
) -> None:
    """Encoder and `num_steps` decode steps at one batch size, ORT vs PyTorch."""
    cfg = model.config
    bos = runner.bundle.special_ids["bos"]
    users = rng.integers(0, cfg.num_users, batch)
    items = rng.integers(0, cfg.num_items, batch)
    watch = PoolWatch(runner, rng, checks, f"untouched_slots[B={batch}]")
    perm = rng.permutation(runner.num_slots)
    # greedy rows ping-pong between two slot sets (read != write, as in beam search);
    # sampling rows read and write the same slots
    greedy_a, greedy_b, sampled = perm[:batch], perm[batch:2 * batch], perm[2 * batch:3 * batch]
    tag = f"B={batch}"

    with torch.no_grad():
        t_rating, t_hidden = model.encoder(torch.as_tensor(users), torch.as_tensor(items))
    both = np.concatenate([greedy_a, sampled])
    rating = runner.encode(both, np.tile(users, 2), np.tile(items, 2))
    pool = watch.after(both, f"encode {tag}")
    checks.diff(f"encoder[{tag}].rating", rating, t_rating.repeat(2), RATING_TOLERANCE, tag)
    state_tol = spec.hidden_tolerance
    checks.diff(f"encoder[{tag}].state", _as_f32(pool[:, both]), t_hidden.repeat(1, 2, 1),
                state_tol, tag)

    v_pool = pool[:, greedy_a].copy()  # the verification graph's own pool, slot b = row b
    tokens = np.full(batch, bos, dtype=np.int64)
    read, write = greedy_a, greedy_b
    for step in range(num_steps):
        where = f"{tag} step {step}"
        with torch.no_grad():
            t_lp, t_hidden = model.decoder(torch.as_tensor(tokens)[:, None], t_hidden)
        t_lp = t_lp[:, 0]  # (B, V)

        v_pool, v_lp = vgraph.step(v_pool, tokens)
        checks.diff(f"step[{tag}].log_probs", v_lp, t_lp, spec.log_prob_tolerance, where)
        checks.diff(f"step[{tag}].hidden", _as_f32(v_pool), t_hidden, state_tol, where)

        out = runner.step(read, write, tokens)
        pool = watch.after(write, f"greedy {where}")
        checks.diff(f"served.greedy[{tag}].hidden", _as_f32(pool[:, write]), t_hidden,
                    state_tol, where)
        checks.shape(f"served.greedy[{tag}].next_token", out.next_tokens.shape, (batch,), where)
        checks.value(f"served.greedy[{tag}].argmax_gap", _argmax_gap(t_lp, out.next_tokens),
                     spec.greedy_tie_margin, where)
        read, write = write, read

        if runner.top_k:
            _topk_step(runner, watch, sampled, tokens, t_lp, t_hidden, spec, checks, tag, where)
        tokens = t_lp.argmax(dim=1).numpy()  # both sides follow PyTorch's greedy path


def _topk_step(runner, watch, slots, tokens, t_lp, t_hidden, spec, checks, tag, where) -> None:
    k = runner.top_k
    out = runner.step(slots, slots, tokens, want_topk=True)
    pool = watch.after(slots, f"top-k {where}")
    name = f"served.topk[{tag}]"
    checks.diff(f"{name}.hidden", _as_f32(pool[:, slots]), t_hidden, spec.hidden_tolerance, where)
    expected = torch.topk(t_lp, k, dim=1).values
    checks.diff(f"{name}.logprobs", out.topk_logprobs, expected, spec.log_prob_tolerance, where)
    # the ids must point at the log-probs reported for them (robust to ties in the order)
    checks.shape(f"{name}.ids", out.topk_ids.shape, tuple(expected.shape), where)
    at_ids = t_lp.gather(1, torch.as_tensor(out.topk_ids, dtype=torch.int64))
    checks.diff(f"{name}.ids", out.topk_logprobs, at_ids, spec.log_prob_tolerance, where)
    checks.value(f"{name}.argmax_gap", _argmax_gap(t_lp, out.next_tokens),
                 spec.greedy_tie_margin, where)
    if runner.head_top_k:
        # the head graph reads the candidates of the states the step just wrote, and writes
        # nothing (min_tokens on the greedy graph relies on both)
        head_lp, head_ids = runner.candidates(slots)
        watch.after(np.zeros(0, dtype=np.int64), f"head {where}")
        head = f"served.head[{tag}]"
        expected = torch.topk(t_lp, runner.head_top_k, dim=1).values
        checks.diff(f"{head}.logprobs", head_lp, expected, spec.log_prob_tolerance, where)
        at_ids = t_lp.gather(1, torch.as_tensor(head_ids, dtype=torch.int64))
        checks.diff(f"{head}.ids", head_lp, at_ids, spec.log_prob_tolerance, where)


def _teacher_forced(runner: StepRunner, slots, users, items, expected: list[list[int]],
                    bos: int, eos: int, max_tokens: int) -> tuple[int, int]:
    """Steps along PyTorch's greedy decodes (their <eos> included), each fed PyTorch's token:
    returns (steps, steps where the served graph's next token is PyTorch's)."""
    targets = [want + [eos] if len(want) < max_tokens else want for want in expected]
    runner.encode(slots, users, items)
    tokens = np.full(len(slots), bos, dtype=np.int64)
    num_steps = num_agreeing = 0
    for t in range(max(len(target) for target in targets)):
        rows = np.array([r for r, target in enumerate(targets) if len(target) > t])
        want = np.array([targets[r][t] for r in rows], dtype=np.int64)
        got = runner.step(slots[rows], slots[rows], tokens[rows]).next_tokens
        num_steps += len(rows)
        num_agreeing += int(np.count_nonzero(got == want))
        tokens[rows] = want
    return num_steps, num_agreeing


def _margin(model: NRT, user: int, item: int, prefix: list[int], a: int, b: int, bos: int) -> float:
    """PyTorch's log-prob gap between tokens a and b after [bos] + prefix."""
    with torch.no_grad():
        _, hidden = model.encoder(torch.tensor([user]), torch.tensor([item]))
        seq = torch.tensor([[bos, *prefix]])
        log_probs, _ = model.decoder(seq, hidden)
    return float(log_probs[0, -1, a] - log_probs[0, -1, b])


def greedy_parity(
    bundle: Bundle, model: NRT, runner: StepRunner, spec: PrecisionSpec, samples: int,
    seed: int, progress: bool,
) -> GreedyParity:
    cfg = model.config
    bos, eos = bundle.special_ids["bos"], bundle.special_ids["eos"]
    users, items = verify_pairs(cfg.num_users, cfg.num_items, samples, seed)
    rng = np.random.default_rng([seed, 2])  # the slots each chunk decodes in
    report = GreedyParity(max_tokens=bundle.max_len, tie_margin=spec.greedy_tie_margin,
                          min_agreement=spec.min_agreement, seed=seed)
    chunk = min(GREEDY_CHUNK, runner.num_slots)
    starts = range(0, samples, chunk)
    for start in tqdm(starts, desc="greedy parity", unit="batch", disable=not progress):
        u, i = users[start:start + chunk], items[start:start + chunk]
        expected, _ = greedy_decode(
            model, torch.as_tensor(u), torch.as_tensor(i), bos, eos, bundle.max_len
        )
        slots = rng.permutation(runner.num_slots)[: len(u)]
        got = greedy_decodes(runner, slots, u, i, bos, eos, bundle.max_len)
        steps, agreeing = _teacher_forced(runner, slots, u, i, expected, bos, eos, bundle.max_len)
        report.num_steps += steps
        report.num_steps_agreeing += agreeing
        for row, (want, have) in enumerate(zip(expected, got, strict=True)):
            report.num_pairs += 1
            if want == have:
                report.num_identical += 1
                continue
            pairs = zip(want, have, strict=False)
            pos = next((p for p, (x, y) in enumerate(pairs) if x != y), None)
            pos = min(len(want), len(have)) if pos is None else pos
            exp_tok = want[pos] if pos < len(want) else eos
            got_tok = have[pos] if pos < len(have) else eos
            margin = _margin(model, int(u[row]), int(i[row]), want[:pos], exp_tok, got_tok, bos)
            near_tie = margin <= spec.greedy_tie_margin
            report.num_near_ties += near_tie
            report.num_failed += not near_tie
            if report.first_divergence is None or (
                not near_tie and report.first_divergence["near_tie"]
            ):
                report.first_divergence = {
                    "pair": start + row, "user": bundle.users[u[row]], "item": bundle.items[i[row]],
                    "position": pos, "expected": int(exp_tok), "got": int(got_tok),
                    "margin": margin, "near_tie": bool(near_tie),
                }
    return report
