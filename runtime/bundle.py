"""The model bundle: a directory whose manifest describes and hashes every file.

The runtime trusts nothing it has not checked: a missing file, a wrong hash, an unknown
format version or a graph whose I/O differs from the manifest is refused with one line that
names the file and the problem.
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
BUNDLE_FORMAT = "gruserve-bundle"
FORMAT_VERSION = 1

# Graph roles the runtime knows; the manifest maps each to a file and I/O names.
ENCODER, STEP_GREEDY = "encoder", "decoder_step"
STEP_TOPK, STATE_WRITER = "decoder_step_topk", "state_writer"
# the candidates of states already in the pool, without stepping (optional: older bundles
# have none, and then min_tokens moves a step to the TopK graph)
STEP_HEAD = "decoder_head"
REQUIRED_GRAPHS = (ENCODER, STEP_GREEDY)
# numpy dtype names a manifest may use for a graph's tensors
DTYPES = ("float32", "float16", "int64")
# export precision -> the state pool's dtype (gruserve.export.precision has the details)
POOL_DTYPES = {"fp32": "float32", "fp16": "float16", "int8": "float32"}
# precisions whose graphs only the CPU provider runs (int8: com.microsoft.MatMulIntegerToFloat)
CPU_ONLY_PRECISIONS = frozenset({"int8"})

# role-level names the runtime binds, per graph role (the manifest maps them to graph names)
_POOL_BINDINGS = ("pool", "pool_out")
_STEP_BINDINGS = (*_POOL_BINDINGS, "read_slots", "write_slots", "tokens", "next_token")
ROLE_BINDINGS = {
    ENCODER: (*_POOL_BINDINGS, "slots", "users", "items", "rating"),
    STEP_GREEDY: _STEP_BINDINGS,
    STEP_TOPK: (*_STEP_BINDINGS, "topk_logprobs", "topk_ids"),
    STATE_WRITER: (*_POOL_BINDINGS, "slots", "states"),
    STEP_HEAD: ("pool", "slots", "topk_logprobs", "topk_ids"),
}


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
    # numpy dtype name of the state pool every graph reads and writes ("float32", "float16")
    pool_dtype: str = "float32"
    # the manifest's sha256: it hashes every other file, so it names this exact bundle
    manifest_sha256: str = ""
    # the encoder's embedding rows an unknown user / item is conditioned on (one extra row
    # per table, written at export); None in bundles exported without them
    fallback_user: int | None = None
    fallback_item: int | None = None

    @property
    def name(self) -> str:
        return str(self.manifest.get("model_name", self.path.name))

    @property
    def version(self) -> str:
        """A short id of this exact bundle (its manifest's hash): what a reload changes."""
        return self.manifest_sha256[:12]

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

    @property
    def head_top_k(self) -> int:
        """K of the head graph's candidates; 0 when the bundle has none."""
        spec = self.graphs.get(STEP_HEAD)
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


def _checked_file(root: Path, name: Any, sha256: Any) -> Path:
    """A file the manifest lists: a plain name inside the bundle, present, with its hash."""
    if not isinstance(name, str) or not isinstance(sha256, str):
        raise BundleError(f"{root / MANIFEST}: a file entry needs string 'file' and 'sha256'")
    # a bundle is flat: a listed name with a separator (../x, /etc/x, sub/x) is refused rather
    # than followed, and so is a symlink that leads out of the directory
    if name in ("", ".", "..") or Path(name).name != name or "\\" in name:
        raise BundleError(
            f"{root / MANIFEST}: file name {name!r} is not a plain name inside the bundle"
        )
    path = root / name
    if path.is_symlink() and root.resolve() not in path.resolve().parents:
        raise BundleError(f"{path}: symlink leads outside the bundle directory")
    if not path.is_file():
        raise BundleError(f"{path}: missing (listed in {MANIFEST})")
    actual = sha256_file(path)
    if actual != sha256:
        raise BundleError(
            f"{path}: sha256 mismatch (manifest {sha256[:12]}..., file {actual[:12]}...): "
            "the file was altered or belongs to another bundle"
        )
    return path


def _graph_spec(root: Path, role: str, entry: dict) -> GraphSpec:
    spec = GraphSpec(
        role=role,
        path=_checked_file(root, entry["file"], entry["sha256"]),
        sha256=entry["sha256"],
        inputs=tuple(TensorSpec.from_dict(t) for t in entry["inputs"]),
        outputs=tuple(TensorSpec.from_dict(t) for t in entry["outputs"]),
        bindings={str(k): str(v) for k, v in dict(entry["bindings"]).items()},
        attributes=dict(entry.get("attributes", {})),
    )
    where = f"{root / MANIFEST}: graph '{role}' ({spec.path.name})"
    for t in spec.inputs + spec.outputs:
        if t.dtype not in DTYPES:
            raise BundleError(f"{where}: tensor '{t.name}' has unknown dtype {t.dtype!r}")
    missing = [b for b in ROLE_BINDINGS.get(role, ()) if b not in spec.bindings]
    if missing:
        raise BundleError(f"{where}: bindings lack {missing}")
    names = {t.name for t in spec.inputs + spec.outputs}
    unknown = sorted(v for v in spec.bindings.values() if v not in names)
    if unknown:
        raise BundleError(f"{where}: bindings name {unknown}, which are not graph inputs/outputs")
    if role in (STEP_TOPK, STEP_HEAD):
        top_k = spec.attributes.get("top_k")
        candidates = next(t for t in spec.outputs if t.name == spec.bindings["topk_ids"])
        if type(top_k) is not int or top_k <= 0 or candidates.shape[-1:] != (top_k,):
            raise BundleError(
                f"{where}: attributes.top_k {top_k!r} does not match the graph's "
                f"top-k output shape {list(candidates.shape)}"
            )
    return spec


def _check_model_config(manifest_path: Path, config: dict, special_ids: dict) -> None:
    for name in ("ntoken", "hidden_size", "max_len"):
        value = config.get(name)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise BundleError(f"{manifest_path}: model_config.{name} must be a positive integer")
    for name in ("bos", "eos", "pad", "unk"):
        if name not in special_ids:
            raise BundleError(f"{manifest_path}: special_ids lacks '{name}'")
        if not 0 <= special_ids[name] < config["ntoken"]:
            raise BundleError(f"{manifest_path}: special_ids.{name} is outside the vocabulary")


def _pool_dtype(manifest_path: Path, graphs: dict[str, GraphSpec]) -> str:
    """Every graph that takes the pool must agree on its dtype (the runner allocates one)."""
    dtypes = {}
    for role, spec in graphs.items():
        pool = spec.bindings.get("pool")
        for t in spec.inputs:
            if t.name == pool:
                dtypes[role] = t.dtype
    if len(set(dtypes.values())) > 1:
        raise BundleError(f"{manifest_path}: graphs disagree on the state pool's dtype: {dtypes}")
    return dtypes.get(STEP_GREEDY, "float32")


CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt")


def _not_a_directory(path: Path) -> str:
    """What a file given as a bundle most likely is, and what to do with it."""
    if path.suffix in CHECKPOINT_SUFFIXES or zipfile.is_zipfile(path):  # torch.save: a zip
        return (
            f"{path} is a training checkpoint, not a bundle: export it first with "
            f"`gruserve export {path} --out BUNDLE_DIR`, then serve BUNDLE_DIR"
        )
    if path.name == MANIFEST:
        return f"{path}: give the bundle directory ({path.parent}), not its manifest"
    return f"{path} is a file: a bundle is a directory with a {MANIFEST}"


def _fallback_rows(manifest_path: Path, manifest: dict, num_users: int, num_items: int):
    """(user row, item row) of the fallback embeddings, or (None, None) without them. A
    fallback row comes after the known entities' rows: it can never stand for a known id."""
    entry = manifest.get("fallback_entities")
    if entry is None:
        return None, None
    rows = []
    for side, known in (("user", num_users), ("item", num_items)):
        row = entry.get(side) if isinstance(entry, dict) else None
        if type(row) is not int or row < known:
            raise BundleError(
                f"{manifest_path}: fallback_entities.{side} must be an embedding row after "
                f"the {known} known {side}s, got {row!r}"
            )
        rows.append(row)
    return tuple(rows)


def load_bundle(path: str | Path) -> Bundle:
    """Reads and checks a bundle directory (hashes included); raises BundleError."""
    root = Path(path)
    if root.is_file():
        raise BundleError(_not_a_directory(root))
    if not root.is_dir():
        raise BundleError(f"{root}: bundle directory not found")
    manifest_path = root / MANIFEST
    manifest = _read_json(manifest_path)
    if not isinstance(manifest, dict) or manifest.get("format") != BUNDLE_FORMAT:
        raise BundleError(f"{manifest_path}: not a {BUNDLE_FORMAT} manifest")
    version = manifest.get("format_version")
    if type(version) is not int or version != FORMAT_VERSION:
        raise BundleError(
            f"{manifest_path}: unknown format_version {version!r} "
            f"(this gruserve reads {FORMAT_VERSION})"
        )
    try:
        graph_entries = manifest["graphs"]
        if not isinstance(graph_entries, dict):
            raise BundleError(f"{manifest_path}: 'graphs' must be an object of role -> graph")
        for role in REQUIRED_GRAPHS:
            if role not in graph_entries:
                raise BundleError(f"{manifest_path}: no '{role}' graph")
        graphs = {role: _graph_spec(root, role, entry) for role, entry in graph_entries.items()}
        files = manifest["files"]
        vocab_path = _checked_file(root, files["vocab"]["file"], files["vocab"]["sha256"])
        entities_path = _checked_file(root, files["entities"]["file"], files["entities"]["sha256"])
        special_ids = {str(k): int(v) for k, v in manifest["special_ids"].items()}
        model_config = dict(manifest["model_config"])
    except KeyError as exc:
        raise BundleError(f"{manifest_path}: malformed, missing field {exc}") from None
    except (TypeError, ValueError, AttributeError) as exc:
        raise BundleError(f"{manifest_path}: malformed, bad field ({exc})") from None
    _check_model_config(manifest_path, model_config, special_ids)
    pool_dtype = _pool_dtype(manifest_path, graphs)
    precision = manifest.get("precision", "fp32")
    if POOL_DTYPES.get(precision) != pool_dtype:
        raise BundleError(
            f"{manifest_path}: precision {precision!r} with a {pool_dtype} state pool "
            f"(known: {', '.join(f'{k} -> {v}' for k, v in POOL_DTYPES.items())})"
        )
    vocab = _read_json(vocab_path)
    entities = _read_json(entities_path)
    if not isinstance(vocab, list) or len(vocab) != model_config["ntoken"]:
        raise BundleError(f"{vocab_path}: vocabulary size differs from the model's ntoken")
    if (
        not isinstance(entities, dict)
        or not {"users", "items"} <= entities.keys()
        or not all(isinstance(entities[k], list) for k in ("users", "items"))
    ):
        raise BundleError(f"{entities_path}: needs 'users' and 'items' lists")
    fallback_user, fallback_item = _fallback_rows(
        manifest_path, manifest, len(entities["users"]), len(entities["items"])
    )
    return Bundle(
        path=root,
        manifest=manifest,
        model_config=model_config,
        graphs=graphs,
        vocab=tuple(vocab),
        users=tuple(str(u) for u in entities["users"]),
        items=tuple(str(i) for i in entities["items"]),
        special_ids=special_ids,
        pool_dtype=pool_dtype,
        manifest_sha256=sha256_file(manifest_path),
        fallback_user=fallback_user,
        fallback_item=fallback_item,
    )


@dataclass(frozen=True)
class ModelInfo:
    """What the serving layers need to know of a bundle's model: vocabulary, entities,
    special ids and sizes (no graphs)."""

    name: str
    vocab: tuple[str, ...]
    users: dict[str, int]
    items: dict[str, int]
    bos_id: int
    eos_id: int
    pad_id: int
    unk_id: int
    hidden_size: int
    num_layers: int
    model_config: dict = field(default_factory=dict)
    # embedding rows for unknown users / items (Bundle.fallback_*); None: the bundle has none
    fallback_user: int | None = None
    fallback_item: int | None = None

    @classmethod
    def from_bundle(cls, bundle: Bundle) -> ModelInfo:
        ids = bundle.special_ids
        return cls(
            name=bundle.name,
            vocab=bundle.vocab,
            users={u: i for i, u in enumerate(bundle.users)},
            items={it: i for i, it in enumerate(bundle.items)},
            bos_id=ids["bos"], eos_id=ids["eos"], pad_id=ids["pad"], unk_id=ids["unk"],
            hidden_size=bundle.hidden_size,
            num_layers=bundle.num_layers,
            model_config=dict(bundle.model_config),
            fallback_user=bundle.fallback_user,
            fallback_item=bundle.fallback_item,
        )

    @property
    def has_fallbacks(self) -> bool:
        return self.fallback_user is not None and self.fallback_item is not None

    @property
    def max_len(self) -> int:
        """The model's tip length: the default max_tokens."""
        return int(self.model_config.get("max_len", 15))

    def detokenize(self, token_ids: list[int]) -> str:
        return " ".join(self.vocab[t] for t in token_ids)
