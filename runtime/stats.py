"""What the engine measures: per step (StepStats) and in total (EngineStats).

Plain dataclasses filled on the decode thread; exporters (gruserve.runtime.metrics) and
benchmarks read them and never reach into the engine.
"""

from __future__ import annotations

from dataclasses import dataclass

from .requests import FinishReason, RequestOutput


@dataclass(frozen=True)
class StepStats:
    """What one step did; observers (metrics) receive it on the decode thread."""

    batch_size: int  # rows the step graph ran
    num_admitted: int  # requests that entered slots before the step
    step_seconds: float  # schedule + encode + step + update, wall time
    num_waiting: int
    num_active_slots: int
    num_finished: int
    num_running: int = 0
    num_tokens: int = 0  # tokens appended to outputs (an ending <eos> is not one)


@dataclass
class EngineStats:
    """Totals since start, and the latest gauges. Written by the decode thread only (plain
    ints and floats, so any thread may read them; a reader may see one step's update half
    applied)."""

    num_steps: int = 0
    num_rows: int = 0  # sum of batch sizes
    num_tokens: int = 0
    num_admitted: int = 0
    num_requests_finished: int = 0  # aborted ones included
    num_requests_aborted: int = 0
    step_seconds_total: float = 0.0
    ttft_seconds_total: float = 0.0  # over finished requests that produced a token
    num_ttft: int = 0
    num_waiting: int = 0
    num_running: int = 0
    num_active_slots: int = 0
    last_batch_size: int = 0
    last_step_seconds: float = 0.0

    @property
    def mean_batch_size(self) -> float:
        return self.num_rows / self.num_steps if self.num_steps else 0.0

    @property
    def mean_ttft_seconds(self) -> float:
        return self.ttft_seconds_total / self.num_ttft if self.num_ttft else 0.0

    def record(self, step: StepStats, outputs: list[RequestOutput]) -> None:
        """Adds one step and the outputs it delivered."""
        self.num_steps += step.batch_size > 0
        self.num_rows += step.batch_size
        self.num_tokens += step.num_tokens
        self.num_admitted += step.num_admitted
        self.step_seconds_total += step.step_seconds
        self.last_step_seconds = step.step_seconds
        self.last_batch_size = step.batch_size
        self.num_waiting = step.num_waiting
        self.num_running = step.num_running
        self.num_active_slots = step.num_active_slots
        self.num_requests_finished += step.num_finished
        if not step.num_finished:
            return
        for output in outputs:
            if output.finished:
                self.num_requests_aborted += output.finish_reason is FinishReason.ABORTED
                if output.first_token_s is not None:
                    self.ttft_seconds_total += output.first_token_s
                    self.num_ttft += 1
