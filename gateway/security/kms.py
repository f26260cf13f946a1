"""Key-encryption keys (KEKs) and the KMS that holds them (R-SE-14, R-SE-10; issue 6 §5).

Stored objects are sealed with a data key of their own (``gateway/security/envelope.py``); the data
key is kept only *wrapped* by a key-encryption key that never leaves the KMS. Everything above this
module talks to the :class:`Kms` protocol, so a hardware security module or a cloud KMS replaces the
local provider without touching the archive:

==================  ======================================  =======================================
``Kms`` method      local provider (:class:`LocalKms`)      HSM (PKCS#11) / cloud KMS
==================  ======================================  =======================================
``active``          ``active`` in the key file              the key alias the KMS points at
``wrap``            AES-256-GCM under the KEK, context as   ``C_WrapKey`` (CKM_AES_GCM, context as
                    associated data                         AAD) / KMS ``Encrypt`` with an
                                                            encryption context
``unwrap``          AES-256-GCM open                        ``C_UnwrapKey`` / KMS ``Decrypt``
``generate``        32 random bytes, made active            ``C_GenerateKey`` / ``CreateKey`` +
                                                            alias update
``destroy``         material removed, a tombstone kept      ``C_DestroyObject`` /
                                                            ``ScheduleKeyDeletion``
``list_keys``       the file's entries                      the KMS's key list
==================  ======================================  =======================================

Besides KEKs the KMS holds the node's *managed keys*, one key ring per purpose (:data:`PURPOSES`),
used only through the KMS — their material never reaches the code that uses them:

==================  ======================================  =======================================
managed key         local provider                          HSM (PKCS#11) / cloud KMS
==================  ======================================  =======================================
``token-signing``   Ed25519 in the key file; ``sign``       ``C_Sign`` (CKM_EDDSA) / KMS ``Sign``
``audit-checkpoint``  Ed25519; ``sign``                     ``C_Sign`` (CKM_EDDSA) / KMS ``Sign``
``pseudonym``       32 bytes; ``mac`` = HMAC-SHA-256        ``C_Sign`` (CKM_SHA256_HMAC) /
                                                            KMS ``GenerateMac``
``public_key``      kept beside the material (and after     ``C_GetAttributeValue`` (CKA_EC_POINT)
                    destroy: old signatures still verify)   / KMS ``GetPublicKey``
``create_managed``  new key made active, the previous one   ``C_GenerateKeyPair`` / ``CreateKey``;
                    *retired* (still verifies)              import: ``C_UnwrapKey`` / ``ImportKeyMaterial``
==================  ======================================  =======================================

Token-signing and audit-checkpoint keys rotate (a new key id; retired keys still verify until
destroyed). The pseudonym key does not (:data:`NOT_ROTATABLE`): it is the national key every
front-end shares (distributed by importing it, ``ybyx keys import``), and every pseudonym at the
national index and in every catalog is an HMAC under it.

Lifecycle (R-SE-14): *generate* (``ybyx keys generate``), *store* (the KMS; the local key file is
mode 600 and refused when group/world can read it), *distribute* (nodes get only their own KMS
credentials, never key material), *rotate* (``ybyx keys rotate``: a new active KEK and every data
key re-wrapped under it — objects are not rewritten), *destroy* (``ybyx keys destroy``: data still
wrapped under that KEK can no longer be read: crypto-shredding). Key material is never logged nor
put into exception messages; only key ids are.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import hmac
import json
import os
import secrets
import threading
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

KeyState = Literal["active", "retired", "destroyed"]
FORMAT = "ybyx-kek-1"

#: Managed keys by purpose, and their kind (see the module docstring).
PURPOSES: dict[str, Literal["ed25519", "hmac-sha256"]] = {
    "token-signing": "ed25519",
    "audit-checkpoint": "ed25519",
    "pseudonym": "hmac-sha256",
}
_ID_PREFIX = {"token-signing": "tsk", "audit-checkpoint": "ack", "pseudonym": "psk"}
#: Why a purpose cannot be rotated (``ybyx keys rotate`` refuses with this reason).
NOT_ROTATABLE: dict[str, str] = {
    "pseudonym": (
        "the pseudonym key is not rotatable: every person key at the national index and in every "
        "catalog is HMAC-SHA-256 under it, and a new key would give every insured person a new "
        "pseudonym, orphaning their history; changing it means re-keying the national index and every "
        "catalog from the original ID numbers, which are never stored (R-SE-8)"
    ),
}


class KmsError(OSError):
    """A key operation failed; the message names the key id and the reason, never the material."""


class KeyDestroyed(KmsError):
    """The KEK was destroyed: what it wrapped is unreadable for good (R-SE-14 destroy)."""


@dataclass(frozen=True)
class KeyInfo:
    """A KEK as the KMS lists it (no material)."""

    key_id: str
    state: KeyState
    created: str
    destroyed: str = ""


class Kms(Protocol):
    """What the archive needs of a key-management service (see the module docstring's table)."""

    def active(self) -> str:
        """The id of the KEK new data keys are wrapped with; :class:`KmsError` if there is none."""
        ...

    def wrap(self, key_id: str, data_key: bytes, context: bytes) -> bytes:
        """``data_key`` encrypted under KEK ``key_id``, bound to ``context`` (authenticated)."""
        ...

    def unwrap(self, key_id: str, wrapped: bytes, context: bytes) -> bytes:
        """The data key; :class:`KeyDestroyed` / :class:`KmsError` when it cannot be had."""
        ...

    def generate(self) -> KeyInfo:
        """A new KEK, made the active one (the previous active one is retired, still usable)."""
        ...

    def destroy(self, key_id: str) -> KeyInfo:
        """Destroy a KEK's material for good."""
        ...

    def list_keys(self) -> list[KeyInfo]: ...

    # ---- managed keys (signing, MAC): used through the KMS, never handed out -----------------

    def managed_keys(self, purpose: str) -> list[KeyInfo]:
        """The keys of ``purpose`` (a :data:`PURPOSES` name), oldest first."""
        ...

    def managed_active(self, purpose: str) -> str:
        """The id of the key of ``purpose`` in use; :class:`KmsError` if there is none."""
        ...

    def create_managed(self, purpose: str, material: bytes | None = None) -> KeyInfo:
        """A new key of ``purpose`` (random, or ``material`` imported), made active; the previous
        active one is retired (still verifies)."""
        ...

    def destroy_managed(self, purpose: str, key_id: str) -> KeyInfo:
        """Destroy a managed key's secret half (an Ed25519 public half is kept for verification)."""
        ...

    def sign(self, purpose: str, key_id: str, message: bytes) -> bytes:
        """Ed25519 signature of ``message``; :class:`KeyDestroyed` / :class:`KmsError`."""
        ...

    def public_key(self, purpose: str, key_id: str) -> bytes:
        """The raw 32-byte Ed25519 public key (also of a destroyed key)."""
        ...

    def mac(self, purpose: str, key_id: str, message: bytes) -> bytes:
        """HMAC-SHA-256 of ``message`` under the key."""
        ...


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def new_key_id() -> str:
    return f"kek-{datetime.now(UTC):%Y%m%d}-{secrets.token_hex(4)}"


class LocalKms:
    """KEKs in one JSON key file, readable by its owner only (the development and small-site
    provider; production points ``[encryption] kms`` at an HSM/KMS implementing :class:`Kms`).

    The file is re-read when it changes on disk, so a ``ybyx keys rotate`` or ``destroy`` run from
    the command line is seen by a running node without a restart. Writes are atomic (temporary
    file, fsync, rename) and keep mode 600.
    """

    def __init__(self, path: Path, *, create: bool = False) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._stamp: tuple[int, int] | None = None
        self._doc: dict[str, Any] = {}
        self.created: KeyInfo | None = None  # the first KEK, when this call made the key file
        if not self.path.exists():
            if not create:
                raise KmsError(f"{self.path}: no key file (ybyx keys generate -c CONFIG makes one)")
            self.created = self.generate()
        self._load()

    # ---- the file --------------------------------------------------------------------------

    def _load(self) -> dict[str, Any]:
        with self._lock:
            try:
                st = self.path.stat()
            except FileNotFoundError:
                raise KmsError(f"{self.path}: key file is missing") from None
            if st.st_mode & 0o077:
                raise KmsError(f"{self.path}: key file is readable by group or others (chmod 600)")
            stamp = (st.st_mtime_ns, st.st_size)
            if stamp != self._stamp:
                try:
                    doc = json.loads(self.path.read_text(encoding="utf-8"))
                except (ValueError, UnicodeDecodeError):
                    raise KmsError(f"{self.path}: not a ybyx key file (bad JSON)") from None
                if not isinstance(doc, dict) or doc.get("format") != FORMAT:
                    raise KmsError(f"{self.path}: not a ybyx key file (format is not {FORMAT})")
                self._doc, self._stamp = doc, stamp
            return self._doc

    def _save(self, doc: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{secrets.token_hex(4)}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump(doc, fh, indent=1)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        dfd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
        with self._lock:
            self._doc = doc
            st = self.path.stat()
            self._stamp = (st.st_mtime_ns, st.st_size)

    def _entry(self, key_id: str) -> dict[str, Any]:
        for entry in self._load()["keys"]:
            if entry["id"] == key_id:
                return dict(entry)
        raise KmsError(f"KEK {key_id}: not in {self.path}")

    def _material(self, key_id: str) -> bytes:
        entry = self._entry(key_id)
        if entry["state"] == "destroyed":
            raise KeyDestroyed(f"KEK {key_id} was destroyed on {entry.get('destroyed', '?')}")
        return base64.b64decode(entry["material"])

    # ---- Kms -------------------------------------------------------------------------------

    def active(self) -> str:
        key_id = str(self._load().get("active") or "")
        if not key_id:
            raise KmsError(f"{self.path}: no active KEK (ybyx keys rotate makes one)")
        return key_id

    def wrap(self, key_id: str, data_key: bytes, context: bytes) -> bytes:
        nonce = secrets.token_bytes(12)
        return nonce + AESGCM(self._material(key_id)).encrypt(nonce, data_key, key_id.encode() + context)

    def unwrap(self, key_id: str, wrapped: bytes, context: bytes) -> bytes:
        try:
            return AESGCM(self._material(key_id)).decrypt(
                wrapped[:12], wrapped[12:], key_id.encode() + context
            )
        except InvalidTag:
            raise KmsError(f"KEK {key_id}: wrapped data key does not open (altered or another key)") from None

    def generate(self) -> KeyInfo:
        if self._stamp is None:  # a new key file
            doc: dict[str, Any] = {"format": FORMAT, "active": "", "keys": []}
        else:
            doc = copy.deepcopy(self._load())
        for entry in doc["keys"]:
            if entry["state"] == "active":
                entry["state"] = "retired"
        info = KeyInfo(new_key_id(), "active", _now())
        material = base64.b64encode(secrets.token_bytes(32)).decode()
        doc["keys"].append(
            {"id": info.key_id, "state": "active", "created": info.created, "material": material}
        )
        doc["active"] = info.key_id
        self._save(doc)
        return info

    def destroy(self, key_id: str) -> KeyInfo:
        doc = copy.deepcopy(self._load())
        return self._destroy_in(doc, doc, key_id, "KEK")

    def _destroy_in(self, doc: dict[str, Any], ring: dict[str, Any], key_id: str, what: str) -> KeyInfo:
        """Shred ``key_id``'s material in ``ring`` (the KEKs, or one purpose's managed keys) of the
        key file ``doc``, and save it."""
        for entry in ring["keys"]:
            if entry["id"] == key_id:
                if entry["state"] == "destroyed":
                    raise KeyDestroyed(f"{what} {key_id} was already destroyed")
                entry.pop("material", None)
                entry["state"] = "destroyed"
                entry["destroyed"] = _now()
                if ring.get("active") == key_id:
                    ring["active"] = ""
                self._save(doc)
                return KeyInfo(key_id, "destroyed", entry["created"], entry["destroyed"])
        raise KmsError(f"{what} {key_id}: not in {self.path}")

    def list_keys(self) -> list[KeyInfo]:
        return [
            KeyInfo(e["id"], e["state"], e.get("created", ""), e.get("destroyed", ""))
            for e in self._load()["keys"]
        ]

    # ---- managed keys -----------------------------------------------------------------------

    def _ring(self, purpose: str) -> dict[str, Any]:
        if purpose not in PURPOSES:
            raise KmsError(f"{purpose!r}: not a managed key purpose ({', '.join(PURPOSES)})")
        ring: dict[str, Any] = self._load().get("managed", {}).get(purpose, {"active": "", "keys": []})
        return ring

    def _managed_entry(self, purpose: str, key_id: str) -> dict[str, Any]:
        for entry in self._ring(purpose)["keys"]:
            if entry["id"] == key_id:
                return dict(entry)
        raise KmsError(f"{purpose} key {key_id}: not in {self.path}")

    def _secret(self, purpose: str, key_id: str) -> bytes:
        entry = self._managed_entry(purpose, key_id)
        if entry["state"] == "destroyed":
            raise KeyDestroyed(f"{purpose} key {key_id} was destroyed on {entry.get('destroyed', '?')}")
        return base64.b64decode(entry["material"])

    def managed_keys(self, purpose: str) -> list[KeyInfo]:
        return [
            KeyInfo(e["id"], e["state"], e.get("created", ""), e.get("destroyed", ""))
            for e in self._ring(purpose)["keys"]
        ]

    def managed_active(self, purpose: str) -> str:
        key_id = str(self._ring(purpose).get("active") or "")
        if not key_id:
            raise KmsError(f"{self.path}: no active {purpose} key")
        return key_id

    def create_managed(self, purpose: str, material: bytes | None = None) -> KeyInfo:
        self._ring(purpose)  # checks the purpose
        kind = PURPOSES[purpose]
        if material is None:
            material = secrets.token_bytes(32)
        elif len(material) < 32 or (kind == "ed25519" and len(material) != 32):
            raise KmsError(f"{purpose}: imported key material must be 32 bytes")
        doc = copy.deepcopy(self._load())
        ring = doc.setdefault("managed", {}).setdefault(purpose, {"active": "", "keys": []})
        now = _now()
        for entry in ring["keys"]:
            if entry["state"] == "active":
                entry["state"] = "retired"
                entry["retired"] = now
        info = KeyInfo(
            f"{_ID_PREFIX[purpose]}-{datetime.now(UTC):%Y%m%d}-{secrets.token_hex(4)}", "active", now
        )
        entry = {
            "id": info.key_id,
            "state": "active",
            "created": now,
            "material": base64.b64encode(material).decode(),
        }
        if kind == "ed25519":
            public = Ed25519PrivateKey.from_private_bytes(material).public_key()
            raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
            entry["public"] = base64.b64encode(raw).decode()
        ring["keys"].append(entry)
        ring["active"] = info.key_id
        self._save(doc)
        return info

    def destroy_managed(self, purpose: str, key_id: str) -> KeyInfo:
        self._ring(purpose)
        doc = copy.deepcopy(self._load())
        ring = doc.get("managed", {}).get(purpose, {"active": "", "keys": []})
        return self._destroy_in(doc, ring, key_id, f"{purpose} key")

    def retired_at(self, purpose: str, key_id: str) -> str:
        """When a managed key stopped being the active one ("" if it still is or never was)."""
        return str(self._managed_entry(purpose, key_id).get("retired", ""))

    def sign(self, purpose: str, key_id: str, message: bytes) -> bytes:
        if PURPOSES.get(purpose) != "ed25519":
            raise KmsError(f"{purpose}: not a signing key")
        return Ed25519PrivateKey.from_private_bytes(self._secret(purpose, key_id)).sign(message)

    def public_key(self, purpose: str, key_id: str) -> bytes:
        entry = self._managed_entry(purpose, key_id)
        if "public" not in entry:
            raise KmsError(f"{purpose} key {key_id}: has no public key")
        return base64.b64decode(entry["public"])

    def mac(self, purpose: str, key_id: str, message: bytes) -> bytes:
        if PURPOSES.get(purpose) != "hmac-sha256":
            raise KmsError(f"{purpose}: not a MAC key")
        return hmac.new(self._secret(purpose, key_id), message, hashlib.sha256).digest()
