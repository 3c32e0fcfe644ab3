"""Execution-provider choice: --device auto|cpu|cuda, checked after the session exists.

onnxruntime-gpu falls back to the CPU provider with only a log line when the CUDA libraries
are missing, so the provider a session actually got is read back from get_providers().
"""

from __future__ import annotations

import ctypes
import dataclasses
import logging

import onnxruntime as ort

from .bundle import CPU_ONLY_PRECISIONS
from .config import DEVICES, SessionConfig

log = logging.getLogger(__name__)

CPU, CUDA = "CPUExecutionProvider", "CUDAExecutionProvider"
__all__ = ["CPU", "CUDA", "DEVICES", "DeviceError", "SessionConfig", "check_provider",
           "for_precision", "session_options", "wanted_providers"]


class DeviceError(RuntimeError):
    """The requested device cannot be used; the message says why."""


_cuda_dlls_loaded = False


def _preload_cuda() -> None:
    """Loads CUDA/cuDNN from the nvidia-* wheels when present (ORT >= 1.21); harmless otherwise."""
    global _cuda_dlls_loaded
    if _cuda_dlls_loaded:
        return
    _cuda_dlls_loaded = True
    preload = getattr(ort, "preload_dlls", None)
    if preload is not None:
        try:
            preload()
        except Exception as exc:  # noqa: BLE001 - best effort: the session check decides
            log.debug("onnxruntime.preload_dlls failed: %s", exc)


def _cuda_driver_present() -> bool:
    """auto skips CUDA without a driver, sparing a CPU host ORT's provider-load error."""
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    return True


def wanted_providers(config: SessionConfig) -> list:
    if config.device not in DEVICES:
        raise DeviceError(f"--device must be one of {', '.join(DEVICES)}, got {config.device!r}")
    available = ort.get_available_providers()
    if config.device == "cpu":
        return [CPU]
    if CUDA not in available or (config.device == "auto" and not _cuda_driver_present()):
        if config.device == "cuda":
            raise DeviceError(
                "--device cuda: this onnxruntime build has no CUDAExecutionProvider "
                f"(available: {', '.join(available)}); install onnxruntime-gpu"
            )
        return [CPU]
    _preload_cuda()
    cuda_options = {"device_id": config.device_id}
    if config.cuda_graphs:
        cuda_options["enable_cuda_graph"] = "1"
    return [(CUDA, cuda_options), CPU]


def for_precision(precision: str, config: SessionConfig) -> SessionConfig:
    """The session config a bundle of this precision runs with. int8 graphs are a CPU format
    (their quantized MatMuls are CPU kernels): --device cuda is refused, auto means cpu."""
    if precision not in CPU_ONLY_PRECISIONS or config.device == "cpu":
        return config
    if config.device == "cuda":
        raise DeviceError(
            f"--device cuda: this bundle is {precision}, a CPU-only format; serve it with "
            "--device cpu (or auto), or export fp32/fp16 for the GPU"
        )
    log.info("%s bundle: running on the CPU provider (--device auto)", precision)
    return dataclasses.replace(config, device="cpu", cuda_graphs=False)


def check_provider(session: ort.InferenceSession, config: SessionConfig, what: str) -> str:
    """Returns the provider the session runs on; raises when cuda was demanded and lost."""
    got = session.get_providers()[0]
    if config.device == "cuda" and got != CUDA:
        raise DeviceError(
            f"--device cuda: {what} fell back to {got} (CUDA libraries missing or no GPU; "
            "see onnxruntime's log above)"
        )
    return got


def session_options(config: SessionConfig) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if config.intra_op_threads:
        options.intra_op_num_threads = config.intra_op_threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # the decode thread alternates between sessions; spinning threads of an idle session
    # would steal the cores from the busy one (measured: 30-60% lost on 2 cores)
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3
    return options
