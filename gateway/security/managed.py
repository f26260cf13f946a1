"""Keys used through the KMS, never held by the code that uses them (R-SE-14, issue 6 §5).

A node's token-signing key (``[security] signing_key_source = "kms"``), its audit checkpoint key
(``[audit] signing_key_source = "kms"``) and the national pseudonym key (``[identity] key_source =
"kms"``) are managed keys of the node's KMS (``gateway/security/kms.py``, the ``[encryption]``
key file or an HSM): the objects here only ask the KMS to sign or MAC, so with an HSM the material
never leaves it. The key id, never the material, is what logs and audit records name.

* :class:`KmsSigner` signs with one Ed25519 key of the KMS; it has the two methods of an
  ``Ed25519PrivateKey`` the audit checkpoints use (``sign``, ``public_key``).
* :class:`ManagedTokenKeys` is a token issuer's key ring: it signs with the KMS's active
  token-signing key (a ``ybyx keys rotate --purpose token-signing`` is picked up by a running node
  at its next token) and verifies with every key not destroyed, so tokens signed before a rotation
  stay valid until they expire.
* :class:`KmsPseudonymKey` computes HMAC-SHA-256 pseudonyms under the national key (not rotatable).
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING, Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from gateway.security.kms import Kms, KmsError
from gateway.security.tokens import SigningKey, VerificationKey, kid_of

if TYPE_CHECKING:
    from gateway.archive.catalog import Catalog
    from gateway.audit import AuditLog
    from gateway.config import EncryptionSection

log = logging.getLogger(__name__)

TOKEN_SIGNING = "token-signing"
AUDIT_CHECKPOINT = "audit-checkpoint"
PSEUDONYM = "pseudonym"


def ensure_active(kms: Kms, purpose: str) -> tuple[str, bool]:
    """The active key of ``purpose``, made if there is none (a signing key, like an SSH host key,
    is made on first start); (key id, whether it was made now)."""
    try:
        return kms.managed_active(purpose), False
    except KmsError:
        if any(k.state != "destroyed" for k in kms.managed_keys(purpose)):
            raise  # keys exist but none is active: an operator's decision, not ours
    info = kms.create_managed(purpose)
    log.warning("generated a new %s key %s in the KMS", purpose, info.key_id)
    return info.key_id, True


def open_node_kms(cfg: EncryptionSection, catalog: Catalog) -> Kms:
    """The node's KMS (its ``[encryption]`` section), also when object sealing is off."""
    from gateway.archive import open_kms

    return open_kms(cfg, catalog)


class KmsSigner:
    """One Ed25519 key of the KMS, usable where an ``Ed25519PrivateKey`` signs (``sign``,
    ``public_key``) without the private key ever being here."""

    def __init__(self, kms: Kms, purpose: str, key_id: str) -> None:
        self.kms = kms
        self.purpose = purpose
        self.key_id = key_id
        self._public = Ed25519PublicKey.from_public_bytes(kms.public_key(purpose, key_id))

    def sign(self, data: bytes) -> bytes:
        return self.kms.sign(self.purpose, self.key_id, data)

    def public_key(self) -> Ed25519PublicKey:
        return self._public

    def __repr__(self) -> str:  # never material: there is none here
        return f"KmsSigner({self.purpose}:{self.key_id})"


class ManagedTokenKeys:
    """A token issuer's keys in the KMS: the active one signs, every one not destroyed verifies
    (a ``KeySource`` for :class:`~gateway.security.tokens.TokenVerifier`, with ``jwks``)."""

    def __init__(self, kms: Kms, purpose: str = TOKEN_SIGNING) -> None:
        self.kms = kms
        self.purpose = purpose
        self._lock = threading.Lock()
        self._signers: dict[str, SigningKey] = {}
        self._public: dict[str, VerificationKey] = {}  # KMS key id -> verification key

    def _verification(self, key_id: str) -> VerificationKey:
        with self._lock:
            found = self._public.get(key_id)
        if found is None:
            public = Ed25519PublicKey.from_public_bytes(self.kms.public_key(self.purpose, key_id))
            found = VerificationKey(kid_of(public), public)
            with self._lock:
                self._public[key_id] = found
        return found

    def current(self) -> SigningKey:
        """The signing key to use now (the KMS's active one: re-read after a rotation)."""
        key_id = self.kms.managed_active(self.purpose)
        with self._lock:
            found = self._signers.get(key_id)
        if found is None:
            signer = KmsSigner(self.kms, self.purpose, key_id)
            found = SigningKey(kid_of(signer.public_key()), signer)
            with self._lock:
                self._signers[key_id] = found
        return found

    def _live(self) -> list[VerificationKey]:
        return [
            self._verification(k.key_id)
            for k in self.kms.managed_keys(self.purpose)
            if k.state != "destroyed"
        ]

    def get(self, kid: str) -> VerificationKey | None:
        return next((k for k in self._live() if k.kid == kid), None)

    def refresh(self) -> bool:
        return False

    @property
    def kids(self) -> list[str]:
        return [k.kid for k in self._live()]

    def jwks(self) -> dict[str, list[dict[str, str]]]:
        return {"keys": [k.jwk() for k in self._live()]}


class KmsPseudonymKey:
    """The national pseudonym key in the KMS: ``digest`` is HMAC-SHA-256 under it (R-SE-8)."""

    def __init__(self, kms: Kms) -> None:
        self.kms = kms
        self.key_id = kms.managed_active(PSEUDONYM)

    def digest(self, message: bytes) -> bytes:
        return self.kms.mac(PSEUDONYM, self.key_id, message)

    def __repr__(self) -> str:
        return f"KmsPseudonymKey({self.key_id})"


def uses_kms(cfg: Any) -> bool:
    """Whether a role config keeps any managed key in its KMS."""
    identity = getattr(cfg, "identity", None)
    return (
        cfg.security.signing_key_source == "kms"
        or cfg.audit.signing_key_source == "kms"
        or (identity is not None and identity.key_source == "kms")
    )


def node_kms(
    cfg: Any, catalog: Catalog, known: Kms | None = None
) -> tuple[Kms | None, list[tuple[str, str]]]:
    """The node's KMS when its config keeps managed keys there (``known``: the archive's, if it has
    one), with the audit-checkpoint key made ready; (KMS, [(purpose, key id) made now]).
    Raises ``ArchiveUnavailable`` naming the config key at fault."""
    from gateway.archive import ArchiveUnavailable

    if not uses_kms(cfg):
        return known, []
    try:
        kms = known or open_node_kms(cfg.encryption, catalog)
    except OSError as exc:
        raise ArchiveUnavailable("encryption.key_file", str(exc)) from exc
    made: list[tuple[str, str]] = []
    if cfg.audit.signing_key_source == "kms":
        try:
            key_id, new = ensure_active(kms, AUDIT_CHECKPOINT)
        except KmsError as exc:
            raise ArchiveUnavailable("audit.signing_key_source", str(exc)) from exc
        if new:
            made.append((AUDIT_CHECKPOINT, key_id))
    return kms, made


def pseudonym_key(cfg: Any, kms: Kms | None) -> KmsPseudonymKey:
    """The pseudonym key of ``[identity] key_source = "kms"``; ``ArchiveUnavailable`` if the KMS
    holds none (it is imported, never made at start: every front-end must share the national key)."""
    from gateway.archive import ArchiveUnavailable

    if kms is None:
        raise ArchiveUnavailable("identity.key_source", "kms: this node has no KMS")
    try:
        return KmsPseudonymKey(kms)
    except KmsError as exc:
        raise ArchiveUnavailable(
            "identity.key_source",
            f"{exc}: import the national key with `ybyx keys import --purpose pseudonym --from FILE`",
        ) from exc


def record_created(audit: AuditLog, made: list[tuple[str, str]]) -> None:
    """Keys made at start are key operations like any other (R-SE-14, R-SE-4)."""
    from gateway.audit import EventType, Result

    for purpose, key_id in made:
        audit.record_as(
            audit.system,
            EventType.KEY_OPERATION,
            resource=f"{purpose}:{key_id}",
            result=Result.SUCCESS,
            detail={"operation": "generate", "purpose": purpose, "key_id": key_id, "reason": "first start"},
        )
