"""Fixed-shape step runs, one per batch-size bucket: what CUDA-graph capture needs.

A captured CUDA graph replays the exact kernels and buffer addresses it recorded. So each
bucket (1, 2, 4, ... up to the slot count) owns device buffers for its inputs and outputs,
bound once; a step of B rows pads up to the smallest bucket >= B, copies its ids into that
bucket's buffers in place, and runs with that bucket's `gpu_graph_id`. Padding rows read and
write a scratch slot that no request owns (the pool has one extra row for it), so they never
touch real state; their outputs are sliced away.

Without CUDA graphs the same path still runs (on any provider): that is how its padding and
slicing are tested on a CPU machine.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

STEP_INPUTS = ("read_slots", "write_slots", "tokens")


def bucket_sizes(max_rows: int) -> tuple[int, ...]:
    """Powers of two below max_rows, then max_rows itself: at most 2x padding per step."""
    sizes, size = [], 1
    while size < max_rows:
        sizes.append(size)
        size *= 2
    sizes.append(max_rows)
    return tuple(sizes)


@dataclass
class _Bucket:
    size: int
    binding: ort.IOBinding
    inputs: dict[str, ort.OrtValue]
    outputs: list[ort.OrtValue]
    run_options: ort.RunOptions


class BucketedStep:
    """Runs one step graph through per-bucket, fixed-address I/O bindings."""

    def __init__(
        self,
        session: ort.InferenceSession,
        names: dict[str, str],
        pool: ort.OrtValue,
        *,
        scratch_slot: int,
        max_rows: int,
        outputs: tuple[tuple[str, tuple[int, ...], np.dtype], ...],  # (role, row shape, dtype)
        device: str,
        device_id: int,
        capture: bool,
    ) -> None:
        self.session = session
        self.scratch_slot = scratch_slot
        self.output_roles = tuple(role for role, _, _ in outputs)
        self.buckets: list[_Bucket] = []
        for graph_id, size in enumerate(bucket_sizes(max_rows)):
            binding = session.io_binding()
            binding.bind_ortvalue_input(names["pool"], pool)
            binding.bind_ortvalue_output(names["pool_out"], pool)
            inputs = {}
            for role in STEP_INPUTS:
                value = ort.OrtValue.ortvalue_from_numpy(
                    np.zeros(size, np.int64), device, device_id
                )
                binding.bind_ortvalue_input(names[role], value)
                inputs[role] = value
            bound_outputs = []
            for role, row_shape, dtype in outputs:
                value = ort.OrtValue.ortvalue_from_shape_and_type(
                    [size, *row_shape], dtype, device, device_id
                )
                binding.bind_ortvalue_output(names[role], value)
                bound_outputs.append(value)
            run_options = ort.RunOptions()
            if capture:
                run_options.add_run_config_entry("gpu_graph_id", str(graph_id))
            self.buckets.append(_Bucket(size, binding, inputs, bound_outputs, run_options))

    def _bucket_for(self, rows: int) -> _Bucket:
        for bucket in self.buckets:
            if bucket.size >= rows:
                return bucket
        raise ValueError(f"{rows} rows exceed the largest bucket ({self.buckets[-1].size})")

    def run(self, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        rows = len(inputs["tokens"])
        bucket = self._bucket_for(rows)
        for role in STEP_INPUTS:
            padded = np.full(bucket.size, self.scratch_slot if role != "tokens" else 0, np.int64)
            padded[:rows] = inputs[role]
            bucket.inputs[role].update_inplace(padded)
        self.session.run_with_iobinding(bucket.binding, bucket.run_options)
        # copies: on CPU numpy() is a view of the bound buffer, which the next run overwrites
        return [np.array(value.numpy()[:rows]) for value in bucket.outputs]
