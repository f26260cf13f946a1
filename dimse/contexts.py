"""Presentation contexts and TCP settings shared by our SCP and SCU."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterable
from typing import Any

from pydicom.uid import (
    HTJ2K,
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import build_context
from pynetdicom.presentation import PresentationContext

# SOP classes we serve besides storage (PS3.4); pynetdicom.sop_class builds these names at run time,
# which type checkers cannot see, so they are spelled out here.
VERIFICATION = "1.2.840.10008.1.1"
STORAGE_COMMITMENT_PUSH = "1.2.840.10008.1.20.1"
STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
STUDY_ROOT_MOVE = "1.2.840.10008.5.1.4.1.2.2.2"
STUDY_ROOT_GET = "1.2.840.10008.5.1.4.1.2.2.3"
PATIENT_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.1.1"
PATIENT_ROOT_MOVE = "1.2.840.10008.5.1.4.1.2.1.2"
PATIENT_ROOT_GET = "1.2.840.10008.5.1.4.1.2.1.3"
# Query/retrieve and storage commitment: the SCP's services besides Verification and storage.
QUERY_AND_COMMITMENT = (
    STUDY_ROOT_FIND,
    STUDY_ROOT_MOVE,
    STUDY_ROOT_GET,
    PATIENT_ROOT_FIND,
    PATIENT_ROOT_MOVE,
    PATIENT_ROOT_GET,
    STORAGE_COMMITMENT_PUSH,
)
NON_STORAGE = frozenset({VERIFICATION, *QUERY_AND_COMMITMENT})

UNCOMPRESSED = [ImplicitVRLittleEndian, ExplicitVRLittleEndian]
# Every transfer syntax we accept as C-STORE SCP (issue 2 §5). The order is our preference when a
# peer offers several in one presentation context (pynetdicom picks by the acceptor's order):
# lossless compressed first (R-UP-1: the modality's own lossless compression is kept, bit-exact),
# then uncompressed, and lossy last (never chosen over the uncompressed original).
ACCEPTED_TRANSFER_SYNTAXES: list[str] = [
    JPEGLSLossless,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    JPEG2000Lossless,
    JPEGLosslessSV1,
    JPEGLossless,
    RLELossless,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    JPEGLSNearLossless,
    JPEG2000,
    HTJ2K,
    JPEGExtended12Bit,
    JPEGBaseline8Bit,
]


def no_delay(sock: socket.socket) -> None:
    """Turn Nagle's algorithm off.

    pynetdicom writes a PDU header and its body in separate sends; with Nagle on, the second waits
    for the peer's delayed ACK (~40 ms), capping loopback C-STORE at ~5 instances/s (issue 2 §5).
    """
    with contextlib.suppress(OSError):  # not a TCP socket
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def no_delay_assoc(assoc: Any) -> None:
    """TCP_NODELAY on an established association's socket (we are the requestor)."""
    sock = getattr(getattr(assoc.dul, "socket", None), "socket", None)
    if sock is not None:
        no_delay(sock)


def contexts_for(pairs: Iterable[tuple[str, str]]) -> list[PresentationContext]:
    """Contexts to send instances stored as (SOP class, transfer syntax) pairs, at most 128.

    Each SOP class is offered with the stored syntaxes, plus both uncompressed ones when any
    stored syntax is uncompressed (so a peer that refuses explicit VR still gets implicit).
    """
    by_class: dict[str, list[str]] = {}
    for sop_class, ts in pairs:
        syntaxes = by_class.setdefault(sop_class, [])
        for candidate in (
            [ts, *UNCOMPRESSED] if UID(ts) in UNCOMPRESSED or not UID(ts).is_compressed else [ts]
        ):
            if candidate not in syntaxes:
                syntaxes.append(candidate)
    contexts = [build_context(sop_class, syntaxes) for sop_class, syntaxes in by_class.items()]
    if len(contexts) > 128:
        raise ValueError(f"{len(contexts)} SOP classes in one request: more than one association can carry")
    return contexts


def retrieve_contexts(pairs: Iterable[tuple[str, str]]) -> list[PresentationContext]:
    """Contexts for C-MOVE sub-operations: instances stored as (SOP class, transfer syntax) pairs
    may go to a peer that takes any syntax or only the uncompressed ones (R-UP-1: compressed
    storage must not cost retrievability).

    Per SOP class: one context per stored transfer syntax other than the two uncompressed
    little-endian ones (so the peer can accept each as stored), and one context offering Explicit
    and Implicit VR Little Endian (what an instance is decoded to when its stored syntax was
    refused: ``gateway.codec.decode``). If that makes more than 128 contexts, one context per SOP
    class carries all of them (the peer then picks one syntax per class).
    """
    by_class: dict[str, list[str]] = {}
    for sop_class, ts in pairs:
        stored = by_class.setdefault(sop_class, [])
        if ts not in stored and UID(ts) not in UNCOMPRESSED:
            stored.append(ts)
    contexts: list[PresentationContext] = []
    for sop_class, stored in by_class.items():
        contexts.extend(build_context(sop_class, ts) for ts in stored)
        contexts.append(build_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian]))
    if len(contexts) > 128:
        contexts = [
            build_context(sop_class, [*stored, ExplicitVRLittleEndian, ImplicitVRLittleEndian])
            for sop_class, stored in by_class.items()
        ]
    if len(contexts) > 128:
        raise ValueError(f"{len(contexts)} SOP classes in one request: more than one association can carry")
    return contexts


def accepted_syntaxes(assoc: Any, sop_class: str) -> set[str]:
    """The transfer syntaxes ``assoc`` accepted for sending ``sop_class`` (we as Storage SCU:
    the C-MOVE sub-association we requested, or the C-GET association with SCP role selection)."""
    return {
        str(cx.transfer_syntax[0])
        for cx in assoc.accepted_contexts
        if cx.abstract_syntax == sop_class and cx.as_scu and cx.transfer_syntax
    }
