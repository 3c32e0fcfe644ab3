"""The built-in demo bundle: trained on the synthetic corpus on first use, then reused.

Lives under $GRUSERVE_HOME (default ~/.cache/gruserve). Building needs the export extra
(torch, onnx); serving an already-built demo bundle does not.
"""

from __future__ import annotations

import fcntl
import logging
import os
from pathlib import Path

from .bundle import BundleError, load_bundle

log = logging.getLogger(__name__)

DEMO_NAME = "demo-bundle-v1"


def gruserve_home() -> Path:
    return Path(os.environ.get("GRUSERVE_HOME") or Path.home() / ".cache" / "gruserve")


def ensure_demo_bundle(home: Path | None = None) -> Path:
    """Returns the demo bundle's path, building it first if it is missing or broken."""
    home = home or gruserve_home()
    bundle_dir = home / DEMO_NAME
    home.mkdir(parents=True, exist_ok=True)
    # one builder at a time: a second `gruserve serve` waits, then reuses the result
    with open(home / f"{DEMO_NAME}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if bundle_dir.exists():
            try:
                load_bundle(bundle_dir)
                return bundle_dir
            except BundleError as exc:
                log.warning("demo bundle unusable (%s): rebuilding", exc)
        try:
            from gruserve.export.demo import build_demo_bundle
        except ImportError as exc:
            raise BundleError(
                f"{bundle_dir}: no demo bundle yet, and building one needs the export extra "
                f"(pip install 'gruserve[export]'): {exc}"
            ) from None
        log.info("building the demo bundle in %s (first use: a minute or two)", bundle_dir)
        build_demo_bundle(bundle_dir, work_dir=home / f"{DEMO_NAME}-train")
    return bundle_dir
