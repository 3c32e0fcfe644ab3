"""The model bundle: a directory whose manifest describes and hashes every file.

The runtime trusts nothing it has not checked: a missing file, a wrong hash, an unknown
format version or a graph whose I/O differs from the manifest is refused with one line that
names the file and the problem.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
BUNDLE_FORMAT = "gruserve-bundle"
FORMAT_VERSION = 1

# Graph roles the runtime knows; the manifest maps each to a file and I/O names.
ENCODER, STEP_GREEDY, STEP_TOPK, STATE_WRITER = "encoder", "decoder_step", "decoder_step_topk", "state_writer"
REQUIRED_GRAPHS = (ENCODER, STEP_GREEDY)


class BundleError(Exception):
    """A bundle that cannot be served; the message names the file and the problem."""


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name, e.g. "float32", "int64"
    shape: tuple[int | str, ...]  # ints are fixed, strings are symbolic (dynamic)

    @classmethod
    def from_dict(cls, data: dict) -> TensorSpec:
        return cls(name=data["name"], dtype=data["dtype"], shape=tuple(data["shape"]))

    def to_dict(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


@dataclass(frozen=True)
class GraphSpec:
    role: str
    path: Path
    sha256: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    # role-level names -> graph I/O names, e.g. {"pool": "state_pool"}
    bindings: dict[str, str]
    attributes: dict[str, Any]


@dataclass(frozen=True)
class Bundle:
    path: Path
    manifest: dict[str, Any]
    model_config: dict[str, Any]
    graphs: dict[str, GraphSpec]
    vocab: tuple[str, ...]
    users: tuple[str, ...]
    items: tuple[str, ...]
    special_ids: dict[str, int]

    @property
    def name(self) -> str:
        return str(self.manifest.get("model_name", self.path.name))

    @property
    def precision(self) -> str:
        return str(self.manifest.get("precision", "fp32"))

    @property
    def hidden_size(self) -> int:
        return int(self.model_config["hidden_size"])

    @property
    def num_layers(self) -> int:
        return int(self.model_config.get("num_layers", 1))

    @property
    def max_len(self) -> int:
        return int(self.model_config["max_len"])

    @property
    def sampling_top_k(self) -> int:
        spec = self.graphs.get(STEP_TOPK)
        return int(spec.attributes.get("top_k", 0)) if spec else 0


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BundleError(f"{path}: missing") from None
    except (OSError, ValueError) as exc:
        raise BundleError(f"{path}: not valid JSON ({exc})") from None


def _checked_file(root: Path, name: str, sha256: str) -> Path:
    path = root / name
    if not path.is_file():
        raise BundleError(f"{path}: missing (listed in {MANIFEST})")
    actual = sha256_file(path)
    if actual != sha256:
        raise BundleError(
            f"{path}: sha256 mismatch (manifest {sha256[:12]}..., file {actual[:12]}...): "
            "the file was altered or belongs to another bundle"
        )
    return path


def load_bundle(path: str | Path) -> Bundle:
    """Reads and checks a bundle directory (hashes included); raises BundleError."""
    root = Path(path)
    if not root.is_dir():
        raise BundleError(f"{root}: bundle directory not found")
    manifest_path = root / MANIFEST
    manifest = _read_json(manifest_path)
    if not isinstance(manifest, dict) or manifest.get("format") != BUNDLE_FORMAT:
        raise BundleError(f"{manifest_path}: not a {BUNDLE_FORMAT} manifest")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise BundleError(
            f"{manifest_path}: unknown format_version {version!r} (this gruserve reads {FORMAT_VERSION})"
        )
    try:
        graphs = {
            role: GraphSpec(
                role=role,
                path=_checked_file(root, entry["file"], entry["sha256"]),
                sha256=entry["sha256"],
                inputs=tuple(TensorSpec.from_dict(t) for t in entry["inputs"]),
                outputs=tuple(TensorSpec.from_dict(t) for t in entry["outputs"]),
                bindings=dict(entry["bindings"]),
                attributes=dict(entry.get("attributes", {})),
            )
            for role, entry in manifest["graphs"].items()
        }
        for role in REQUIRED_GRAPHS:
            if role not in graphs:
                raise BundleError(f"{manifest_path}: no '{role}' graph")
        files = manifest["files"]
        vocab = _read_json(_checked_file(root, files["vocab"]["file"], files["vocab"]["sha256"]))
        entities = _read_json(
            _checked_file(root, files["entities"]["file"], files["entities"]["sha256"])
        )
        special_ids = {k: int(v) for k, v in manifest["special_ids"].items()}
        model_config = dict(manifest["model_config"])
    except (KeyError, TypeError) as exc:
        raise BundleError(f"{manifest_path}: malformed, missing or bad field {exc}") from None
    if not isinstance(vocab, list) or len(vocab) != int(model_config["ntoken"]):
        raise BundleError(f"{root / files['vocab']['file']}: vocabulary size differs from the model's ntoken")
    if not isinstance(entities, dict) or not {"users", "items"} <= entities.keys():
        raise BundleError(f"{root / files['entities']['file']}: needs 'users' and 'items' lists")
    return Bundle(
        path=root,
        manifest=manifest,
        model_config=model_config,
        graphs=graphs,
        vocab=tuple(vocab),
        users=tuple(str(u) for u in entities["users"]),
        items=tuple(str(i) for i in entities["items"]),
        special_ids=special_ids,
    )
