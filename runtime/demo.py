"""The embedded demo model: what `gruserve serve` serves when it is given no bundle.

A small NRT trained on the built-in synthetic corpus, exported and verified, and shipped
inside the package as data (gruserve/runtime/demo_model/bundle, 1.2 MB), so a runtime-only
install (`pip install gruserve`, no torch) serves it at once. The checkpoint it was exported
from stays in the repository beside it (runtime/demo_model/checkpoint.pt), out of the wheel;
`make demo-bundle` (gruserve.export.demo) rebuilds both, and tests/test_demo_model.py proves
the shipped bundle is what that checkpoint exports to.
"""

from __future__ import annotations

from pathlib import Path

from .bundle import MANIFEST, BundleError

DEMO_MODEL_DIR = Path(__file__).resolve().parent / "demo_model"
DEMO_BUNDLE = DEMO_MODEL_DIR / "bundle"


def demo_bundle_dir() -> Path:
    """The embedded demo bundle's directory (load_bundle checks its files and hashes)."""
    if not (DEMO_BUNDLE / MANIFEST).is_file():
        raise BundleError(
            f"{DEMO_BUNDLE}: the embedded demo bundle is missing from this installation "
            "(reinstall gruserve, or give a bundle directory)"
        )
    return DEMO_BUNDLE
