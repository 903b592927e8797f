"""Gallery sync wire format, shared by the central server and the agent.

docs/protocol.md is the reference for the topics and the message layouts. In short:

- A group's retained manifest names the latest gallery version, the model id,
  the embedding size, the metric, the current snapshot and the deltas since it,
  with the size, the sha256 and the per-chunk sha256 values of each.
- The manifest travels as the exact UTF-8 JSON text that the server signed with
  Ed25519, beside the signature. Devices pin the server's public key, so the
  signature covers every chunk through its digest.
- Snapshots and deltas are binary objects (a JSON header, then float32 rows),
  split into chunks of at most `chunk_bytes` so that no message exceeds the
  broker's maximum packet size.
- An object of more than INLINE_CHUNKS_MAX chunks keeps its chunk digests in
  a digest list (the raw 32-byte sha256 values, concatenated). The list is
  published in chunks of its own, and the manifest carries their digests. This
  keeps the manifest small: a 1M-identity snapshot of about
  4,500 chunks needs two digest-list chunks at 128 KiB.

Every parse function here raises ProtocolError with a short `reason` code, which
the agent puts in its log line so that each kind of rejection can be distinguished.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

SCHEMA_VERSION = 1
OBJECT_MAGIC = b"FNGB"
OBJECT_FORMAT = 1
KIND_CODES = {"snapshot": 1, "delta": 2}
# magic, format, kind code, two reserved bytes, header length
_OBJECT_PREFIX = struct.Struct("<4sBBHI")
OPS = ("add", "update", "remove")
MAX_ID_CHARS = 256
MAX_VERSION = 2**53  # JSON numbers above this lose precision in many decoders
# L2-normalised float32 embeddings have a norm within about 1e-6 of 1.
UNIT_NORM_TOLERANCE = 1e-3
SIGNATURE_BYTES = 64
PUBLIC_KEY_BYTES = 32
DIGEST_BYTES = 32  # sha256
# Objects with more chunks than this list their chunk digests in a digest list
# rather than in the manifest, where each digest takes 67 bytes of JSON.
INLINE_CHUNKS_MAX = 64


class ProtocolError(ValueError):
    """A message that breaks the gallery protocol; `reason` is a short code for logs."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


# Topics


def group_topic(prefix: str, group: str) -> str:
    return f"{prefix}/gallery/{group}"


def manifest_topic(prefix: str, group: str) -> str:
    return f"{group_topic(prefix, group)}/manifest"


def chunk_topic(prefix: str, group: str, kind: str, version: int, index: int) -> str:
    return f"{group_topic(prefix, group)}/{kind}/{version}/{index}"


def digest_chunk_topic(prefix: str, group: str, kind: str, version: int, index: int) -> str:
    return f"{group_topic(prefix, group)}/{kind}/{version}/digests/{index}"


def resync_topic(prefix: str, group: str) -> str:
    return f"{group_topic(prefix, group)}/resync"


@dataclass(frozen=True)
class ChunkAddress:
    """Address of a chunk: part of an object's data, or part of its digest list."""

    kind: str
    version: int
    index: int
    digest_list: bool  # True for a chunk of the object's digest list


def parse_chunk_topic(prefix: str, group: str, topic: str) -> ChunkAddress:
    """Return the address of a data or digest-list chunk topic; raise ProtocolError otherwise."""
    base = group_topic(prefix, group) + "/"
    parts = topic[len(base):].split("/") if topic.startswith(base) else []
    digest_list = len(parts) == 4 and parts[2] == "digests"
    if digest_list:
        del parts[2]
    if len(parts) != 3 or parts[0] not in KIND_CODES:
        raise ProtocolError("bad_topic", f"topic {topic!r} is not a chunk topic under {base}")
    kind, version_text, index_text = parts
    for text in (version_text, index_text):
        if not text.isdigit() or len(text) > 16 or (len(text) > 1 and text[0] == "0"):
            raise ProtocolError("bad_topic", f"topic {topic!r}: {text!r} is not a decimal number")
    return ChunkAddress(kind, int(version_text), int(index_text), digest_list)


def check_group_name(group: str) -> None:
    """Raise ValueError unless `group` can be one MQTT topic level."""
    if not group or any(c in group for c in "/+#$\0") or len(group) > 128:
        raise ValueError(
            f"invalid gallery group {group!r}: use 1 to 128 characters without / + # $ or NUL"
        )


# Keys and signatures


def decode_public_key(text: str) -> bytes:
    """Decode a base64 Ed25519 public key; raise ValueError naming the problem."""
    try:
        key = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"public key {text[:60]!r} is not valid base64: {exc}") from exc
    if len(key) != PUBLIC_KEY_BYTES:
        raise ValueError(
            f"public key must decode to {PUBLIC_KEY_BYTES} bytes (Ed25519), got {len(key)}"
        )
    return key


def key_id(public_key: bytes) -> str:
    """Short fingerprint of a public key: the first 16 hex digits of its sha256."""
    return hashlib.sha256(public_key).hexdigest()[:16]


def sign_manifest(body: dict[str, Any], signing_key: Any) -> bytes:
    """Return the manifest message: the body's JSON text and its Ed25519 signature.

    `signing_key` is a `nacl.signing.SigningKey`.
    """
    text = json.dumps(body, separators=(",", ":"), sort_keys=True, allow_nan=False)
    signature = signing_key.sign(text.encode("utf-8")).signature
    envelope = {
        "manifest": text,
        "signature": base64.b64encode(signature).decode("ascii"),
        "key_id": key_id(bytes(signing_key.verify_key)),
    }
    return json.dumps(envelope, separators=(",", ":")).encode("utf-8")


# Manifest


@dataclass(frozen=True)
class ObjectInfo:
    """A snapshot or delta as the manifest lists it."""

    kind: str
    version: int
    base_version: int | None  # the version a delta applies to; None for a snapshot
    size: int
    sha256: str
    chunk_count: int
    # sha256 of each chunk, in order; empty when `digest_chunks` is set instead.
    chunks: tuple[str, ...]
    identities: int
    embeddings: int
    # sha256 of each chunk of the digest list, when the chunk digests travel
    # in a digest list; empty when `chunks` is set.
    digest_chunks: tuple[str, ...] = ()

    @property
    def digest_list_size(self) -> int:
        """Bytes of the digest list: one raw sha256 per chunk."""
        return self.chunk_count * DIGEST_BYTES


@dataclass(frozen=True)
class Manifest:
    """A verified manifest: the group's latest version and how to reach it."""

    group: str
    version: int
    model_id: str
    embedding_size: int
    metric: str
    chunk_bytes: int
    published_at: str
    snapshot: ObjectInfo
    # Consecutive deltas ending at `version`; the first may start before the snapshot.
    deltas: tuple[ObjectInfo, ...]
    key_id: str

    def delta(self, version: int) -> ObjectInfo | None:
        for info in self.deltas:
            if info.version == version:
                return info
        return None

    def objects(self) -> Iterator[ObjectInfo]:
        yield self.snapshot
        yield from self.deltas


def parse_manifest(payload: bytes, public_key: bytes) -> Manifest:
    """Verify the signature of a manifest message and check its fields.

    Checks only what the message itself states; the caller compares the group,
    the model id, the embedding size and the version with its own.
    """
    from nacl.exceptions import BadSignatureError
    from nacl.signing import VerifyKey

    envelope = _load_json(payload, "manifest message")
    if not isinstance(envelope, dict):
        raise ProtocolError("invalid_manifest", "manifest message is not a JSON object")
    text = envelope.get("manifest")
    signature_text = envelope.get("signature")
    if not isinstance(text, str) or not isinstance(signature_text, str):
        raise ProtocolError(
            "invalid_manifest", "manifest message needs string fields 'manifest' and 'signature'"
        )
    try:
        signature = base64.b64decode(signature_text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ProtocolError("bad_signature", f"signature is not valid base64: {exc}") from exc
    if len(signature) != SIGNATURE_BYTES:
        raise ProtocolError(
            "bad_signature", f"signature has {len(signature)} bytes, expected {SIGNATURE_BYTES}"
        )
    try:
        VerifyKey(public_key).verify(text.encode("utf-8"), signature)
    except BadSignatureError as exc:
        raise ProtocolError(
            "bad_signature",
            f"manifest signature does not verify with the pinned key {key_id(public_key)} "
            f"(message names key {str(envelope.get('key_id'))[:32]!r})",
        ) from exc

    body = _load_json(text.encode("utf-8"), "signed manifest")
    return _manifest_from_body(body, key_id(public_key))


def _manifest_from_body(body: Any, signer: str) -> Manifest:
    if not isinstance(body, dict):
        raise ProtocolError("invalid_manifest", "signed manifest is not a JSON object")
    fields = _Fields(body, "manifest")
    if fields.integer("schema", low=1) != SCHEMA_VERSION:
        raise ProtocolError(
            "invalid_manifest", f"manifest schema {body['schema']} is not {SCHEMA_VERSION}"
        )
    version = fields.integer("version", low=1, high=MAX_VERSION)
    chunk_bytes = fields.integer("chunk_bytes", low=1, high=2**28)
    snapshot = _object_info(fields.mapping("snapshot"), "snapshot", chunk_bytes)
    deltas_raw = fields.value("deltas", list)
    deltas = tuple(_object_info(entry, "delta", chunk_bytes) for entry in deltas_raw)

    # The deltas form one chain ending at `version`. It may start before the
    # snapshot, so that devices just behind a new snapshot still take deltas.
    first_base = deltas[0].base_version if deltas else None
    chain_start = first_base if first_base is not None else snapshot.version
    expected_base = chain_start
    for info in deltas:
        if info.base_version != expected_base or info.version != expected_base + 1:
            raise ProtocolError(
                "invalid_manifest",
                f"manifest deltas are not consecutive: delta {info.version} "
                f"(base {info.base_version}) follows version {expected_base}",
            )
        expected_base = info.version
    if expected_base != version or not chain_start <= snapshot.version <= version:
        raise ProtocolError(
            "invalid_manifest",
            f"manifest version {version} but the deltas run from {chain_start} to "
            f"{expected_base} and the snapshot is version {snapshot.version}",
        )
    return Manifest(
        group=fields.text("group"),
        version=version,
        model_id=fields.text("model_id"),
        embedding_size=fields.integer("embedding_size", low=1, high=65536),
        metric=fields.text("metric"),
        chunk_bytes=chunk_bytes,
        published_at=fields.text("published_at"),
        snapshot=snapshot,
        deltas=deltas,
        key_id=signer,
    )


def _object_info(raw: Any, kind: str, chunk_bytes: int) -> ObjectInfo:
    if not isinstance(raw, dict):
        raise ProtocolError("invalid_manifest", f"manifest {kind} entry is not a JSON object")
    fields = _Fields(raw, f"manifest {kind}")
    version = fields.integer("version", low=1, high=MAX_VERSION)
    base_version = None
    if kind == "delta":
        base_version = fields.integer("base_version", low=0, high=MAX_VERSION)
    size = fields.integer("size", low=_OBJECT_PREFIX.size, high=2**40)
    chunk_count = fields.integer("chunk_count", low=1)
    expected_chunks = math.ceil(size / chunk_bytes)
    if chunk_count != expected_chunks:
        raise ProtocolError(
            "invalid_manifest",
            f"manifest {kind} {version}: chunk_count {chunk_count}, but {size} bytes in "
            f"chunks of {chunk_bytes} make {expected_chunks}",
        )

    if ("chunks" in raw) == ("digest_chunks" in raw):
        raise ProtocolError("invalid_manifest", f"manifest {kind} {version}: needs exactly one "
                                                "of the fields 'chunks' and 'digest_chunks'")
    listed = "digest_chunks" in raw
    digests = fields.value("digest_chunks" if listed else "chunks", list)
    if not all(isinstance(c, str) and _is_sha256(c) for c in digests):
        raise ProtocolError(
            "invalid_manifest", f"manifest {kind} {version}: chunk digests must be sha256 hex "
                                "strings"
        )
    expected_digests = (math.ceil(chunk_count * DIGEST_BYTES / chunk_bytes) if listed
                        else chunk_count)
    if len(digests) != expected_digests:
        raise ProtocolError(
            "invalid_manifest",
            f"manifest {kind} {version}: {len(digests)} "
            f"{'digest-list chunk' if listed else 'chunk'} digests, expected {expected_digests}",
        )

    sha256 = fields.text("sha256")
    if not _is_sha256(sha256):
        raise ProtocolError("invalid_manifest", f"manifest {kind} {version}: sha256 is not hex")
    return ObjectInfo(
        kind=kind,
        version=version,
        base_version=base_version,
        size=size,
        sha256=sha256,
        chunk_count=chunk_count,
        chunks=() if listed else tuple(digests),
        identities=fields.integer("identities", low=0),
        embeddings=fields.integer("embeddings", low=0),
        digest_chunks=tuple(digests) if listed else (),
    )


def object_entry(info: ObjectInfo) -> dict[str, Any]:
    """Build the manifest's JSON entry for one object; the inverse of parsing it."""
    entry: dict[str, Any] = {
        "version": info.version,
        "size": info.size,
        "sha256": info.sha256,
        "chunk_count": info.chunk_count,
        "identities": info.identities,
        "embeddings": info.embeddings,
    }
    if info.digest_chunks:
        entry["digest_chunks"] = list(info.digest_chunks)
    else:
        entry["chunks"] = list(info.chunks)
    if info.base_version is not None:
        entry["base_version"] = info.base_version
    return entry


# Snapshot and delta objects


@dataclass(frozen=True)
class IdentityChange:
    """One identity in an object: its operation and its rows of the object's matrix."""

    identity_id: str
    name: str
    op: str  # "add", "update" or "remove"; a snapshot uses "add" for every identity
    first_row: int
    row_count: int


@dataclass(frozen=True)
class GalleryObject:
    """A decoded snapshot or delta."""

    kind: str
    group: str
    version: int
    base_version: int | None
    model_id: str
    embedding_size: int
    changes: tuple[IdentityChange, ...]
    vectors: np.ndarray  # float32, one row per embedding, in the order of `changes`


def encode_object(
    kind: str,
    *,
    group: str,
    version: int,
    base_version: int | None,
    model_id: str,
    embedding_size: int,
    changes: Sequence[tuple[str, str, str, np.ndarray]],
) -> bytes:
    """Serialise a snapshot or delta from (identity id, name, op, vectors) tuples."""
    entries = []
    matrices = []
    for identity_id, name, op, vectors in changes:
        rows = np.asarray(vectors, dtype="<f4").reshape(-1, embedding_size)
        entries.append({"id": identity_id, "name": name, "op": op, "embeddings": len(rows)})
        matrices.append(rows)
    header = {
        "kind": kind,
        "group": group,
        "version": version,
        "base_version": base_version,
        "model_id": model_id,
        "embedding_size": embedding_size,
        "rows": sum(len(m) for m in matrices),
        "identities": entries,
    }
    header_bytes = json.dumps(header, separators=(",", ":"), allow_nan=False).encode("utf-8")
    prefix = _OBJECT_PREFIX.pack(OBJECT_MAGIC, OBJECT_FORMAT, KIND_CODES[kind], 0,
                                 len(header_bytes))
    body = np.concatenate(matrices) if matrices else np.empty((0, embedding_size), "<f4")
    return prefix + header_bytes + body.astype("<f4").tobytes()


def read_object_header(prefix: bytes) -> tuple[str, int]:
    """Return (kind, header length) from the first bytes of an object."""
    if len(prefix) < _OBJECT_PREFIX.size:
        raise ProtocolError("truncated", f"object is {len(prefix)} bytes, shorter than its prefix")
    magic, fmt, kind_code, _reserved, header_length = _OBJECT_PREFIX.unpack_from(prefix)
    if magic != OBJECT_MAGIC or fmt != OBJECT_FORMAT:
        raise ProtocolError("invalid_object", f"object starts with {magic!r} format {fmt}, "
                            f"expected {OBJECT_MAGIC!r} format {OBJECT_FORMAT}")
    kinds = {code: name for name, code in KIND_CODES.items()}
    if kind_code not in kinds:
        raise ProtocolError("invalid_object", f"object kind code {kind_code} is unknown")
    return kinds[kind_code], header_length


def decode_object(data: bytes | memoryview, info: ObjectInfo, manifest: Manifest) -> GalleryObject:
    """Decode and check an object whose sha256 already matched `info`.

    The header must agree with the manifest (kind, version, base version, group,
    model id, embedding size) and the rows must be finite unit-length vectors.
    """
    kind, header_length = read_object_header(bytes(data[:_OBJECT_PREFIX.size]))
    start = _OBJECT_PREFIX.size
    if len(data) < start + header_length:
        raise ProtocolError("truncated", f"{info.kind} {info.version}: header is cut short")
    header = _load_json(bytes(data[start:start + header_length]), f"{kind} header")
    if not isinstance(header, dict):
        raise ProtocolError("invalid_object", f"{kind} header is not a JSON object")
    fields = _Fields(header, f"{kind} {info.version} header")
    stated = {
        "kind": fields.text("kind"),
        "group": fields.text("group"),
        "version": fields.integer("version", low=1),
        "base_version": header.get("base_version"),
        "model_id": fields.text("model_id"),
        "embedding_size": fields.integer("embedding_size", low=1),
    }
    expected = {
        "kind": info.kind,
        "group": manifest.group,
        "version": info.version,
        "base_version": info.base_version,
        "model_id": manifest.model_id,
        "embedding_size": manifest.embedding_size,
    }
    for key, value in expected.items():
        if stated[key] != value or (key == "kind" and kind != value):
            raise ProtocolError(
                "invalid_object",
                f"{info.kind} {info.version}: header {key} is {stated[key]!r}, "
                f"the manifest says {value!r}",
            )

    changes = _identity_changes(fields.value("identities", list), info)
    rows = fields.integer("rows", low=0)
    if rows != sum(change.row_count for change in changes):
        raise ProtocolError("invalid_object",
                            f"{info.kind} {info.version}: rows {rows} does not match the "
                            "embedding counts of its identities")
    dimension = manifest.embedding_size
    body_start = start + header_length
    expected_size = body_start + rows * dimension * 4
    if len(data) != expected_size:
        raise ProtocolError(
            "truncated" if len(data) < expected_size else "invalid_object",
            f"{info.kind} {info.version}: {len(data)} bytes, expected {expected_size} for "
            f"{rows} rows of {dimension} float32",
        )
    vectors = np.frombuffer(data, dtype="<f4", offset=body_start).reshape(rows, dimension)
    check_vectors(vectors, f"{info.kind} {info.version}")
    return GalleryObject(
        kind=info.kind,
        group=manifest.group,
        version=info.version,
        base_version=info.base_version,
        model_id=manifest.model_id,
        embedding_size=dimension,
        changes=changes,
        vectors=vectors,
    )


def check_vectors(vectors: np.ndarray, what: str) -> None:
    """Raise ProtocolError unless every row is finite and of unit length."""
    if not np.all(np.isfinite(vectors)):
        bad = int(np.flatnonzero(~np.isfinite(vectors).all(axis=1))[0])
        raise ProtocolError("not_finite", f"{what}: row {bad} contains NaN or inf")
    if len(vectors):
        norms = np.linalg.norm(vectors, axis=1)
        off = np.flatnonzero(np.abs(norms - 1.0) > UNIT_NORM_TOLERANCE)
        if len(off):
            raise ProtocolError(
                "not_normalized",
                f"{what}: row {int(off[0])} has L2 norm {float(norms[off[0]]):.6g}, expected 1",
            )


def _identity_changes(entries: list[Any], info: ObjectInfo) -> tuple[IdentityChange, ...]:
    changes = []
    seen: set[str] = set()
    row = 0
    for position, entry in enumerate(entries):
        where = f"{info.kind} {info.version} identity {position}"
        if not isinstance(entry, dict):
            raise ProtocolError("invalid_object", f"{where} is not a JSON object")
        fields = _Fields(entry, where)
        identity_id = fields.text("id")
        if not identity_id or len(identity_id) > MAX_ID_CHARS or identity_id in seen:
            raise ProtocolError("invalid_object",
                                f"{where}: id {identity_id[:80]!r} is empty, too long or repeated")
        seen.add(identity_id)
        op = fields.text("op")
        allowed = ("add",) if info.kind == "snapshot" else OPS
        if op not in allowed:
            raise ProtocolError("invalid_object",
                                f"{where}: op {op[:40]!r} is not one of {allowed}")
        count = fields.integer("embeddings", low=0, high=10_000)
        if (op == "remove") != (count == 0):
            raise ProtocolError("invalid_object",
                                f"{where}: op {op} with {count} embeddings; remove takes none "
                                "and add or update at least one")
        name = fields.text("name")
        if len(name) > MAX_ID_CHARS:
            raise ProtocolError("invalid_object", f"{where}: name longer than {MAX_ID_CHARS}")
        changes.append(IdentityChange(identity_id, name, op, row, count))
        row += count
    if len(changes) != info.identities or row != info.embeddings:
        raise ProtocolError(
            "invalid_object",
            f"{info.kind} {info.version}: {len(changes)} identities and {row} embeddings, the "
            f"manifest says {info.identities} and {info.embeddings}",
        )
    return tuple(changes)


def split_chunks(data: bytes, chunk_bytes: int) -> list[bytes]:
    return [data[i:i + chunk_bytes] for i in range(0, len(data), chunk_bytes)]


def describe_object(kind: str, data: bytes, *, version: int, base_version: int | None,
                    chunk_bytes: int, identities: int, embeddings: int) -> ObjectInfo:
    """Build the manifest entry of an encoded object, with its chunk digests inline."""
    chunks = tuple(hashlib.sha256(c).hexdigest() for c in split_chunks(data, chunk_bytes))
    return ObjectInfo(
        kind=kind,
        version=version,
        base_version=base_version,
        size=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
        chunk_count=len(chunks),
        chunks=chunks,
        identities=identities,
        embeddings=embeddings,
    )


def encode_digest_list(chunks: Sequence[str]) -> bytes:
    """Concatenate the raw sha256 values of an object's chunks: its digest list."""
    return b"".join(bytes.fromhex(digest) for digest in chunks)


def decode_digest_list(data: bytes, info: ObjectInfo) -> tuple[str, ...]:
    """Split a digest list whose chunks matched `info.digest_chunks` into hex digests."""
    if len(data) != info.digest_list_size:
        raise ProtocolError("invalid_object", f"{info.kind} {info.version}: digest list has "
                                              f"{len(data)} bytes, expected "
                                              f"{info.digest_list_size}")
    return tuple(data[i:i + DIGEST_BYTES].hex() for i in range(0, len(data), DIGEST_BYTES))


def with_digest_list(info: ObjectInfo, chunk_bytes: int) -> tuple[ObjectInfo, bytes]:
    """Move an object's chunk digests out of the manifest entry into a digest list.

    Returns the new entry, which names the digest list's chunks, and the list itself,
    which the server publishes in chunks of `chunk_bytes` beside the object.
    """
    if info.digest_chunks:
        raise ValueError(f"{info.kind} {info.version} already has a digest list")
    digest_list = encode_digest_list(info.chunks)
    digest_chunks = tuple(hashlib.sha256(c).hexdigest()
                          for c in split_chunks(digest_list, chunk_bytes))
    return replace(info, chunks=(), digest_chunks=digest_chunks), digest_list


# JSON helpers


def _reject_constant(name: str) -> Any:
    raise ProtocolError("not_finite", f"JSON contains {name}, which is not a finite number")


def _load_json(data: bytes, what: str) -> Any:
    try:
        return json.loads(data.decode("utf-8"), parse_constant=_reject_constant)
    except ProtocolError:
        raise
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ProtocolError("invalid_json", f"{what} is not valid UTF-8 JSON: {exc}") from exc


def _is_sha256(text: str) -> bool:
    return len(text) == 64 and all(c in "0123456789abcdef" for c in text)


class _Fields:
    """Typed access to a JSON object's fields, raising ProtocolError that names the field."""

    def __init__(self, raw: dict[str, Any], where: str) -> None:
        self.raw = raw
        self.where = where

    def value(self, key: str, kind: type) -> Any:
        if key not in self.raw:
            raise ProtocolError("invalid_manifest" if "manifest" in self.where else
                                "invalid_object", f"{self.where}: missing field {key!r}")
        value = self.raw[key]
        if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
            raise ProtocolError(
                "invalid_manifest" if "manifest" in self.where else "invalid_object",
                f"{self.where}: field {key!r} must be {kind.__name__}, got {str(value)[:60]!r}",
            )
        return value

    def text(self, key: str) -> str:
        return str(self.value(key, str))

    def mapping(self, key: str) -> dict[str, Any]:
        return dict(self.value(key, dict))

    def integer(self, key: str, low: int | None = None, high: int | None = None) -> int:
        value = int(self.value(key, int))
        if (low is not None and value < low) or (high is not None and value > high):
            raise ProtocolError(
                "invalid_manifest" if "manifest" in self.where else "invalid_object",
                f"{self.where}: field {key!r} is {value}, outside [{low}, {high}]",
            )
        return value
