"""Presentation contexts and TCP settings shared by our SCP and SCU."""

from __future__ import annotations

import socket
from collections.abc import Iterable

from pynetdicom import build_context
from pynetdicom.presentation import PresentationContext
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    HTJ2K,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    ImplicitVRLittleEndian,
    JPEG2000,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
    UID,
)

UNCOMPRESSED = [ImplicitVRLittleEndian, ExplicitVRLittleEndian]
# Every transfer syntax we accept as C-STORE SCP (issue 2 §5); the order is our preference.
ACCEPTED_TRANSFER_SYNTAXES: list[str] = [
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEG2000Lossless,
    JPEG2000,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    HTJ2K,
    RLELossless,
]


def no_delay(sock: socket.socket) -> None:
    """Turn Nagle's algorithm off.

    pynetdicom writes a PDU header and its body in separate sends; with Nagle on, the second waits
    for the peer's delayed ACK (~40 ms), capping loopback C-STORE at ~5 instances/s (issue 2 §5).
    """
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:  # not a TCP socket (e.g. a socketpair in tests)
        pass


def contexts_for(pairs: Iterable[tuple[str, str]]) -> list[PresentationContext]:
    """Contexts to send instances stored as (SOP class, transfer syntax) pairs, at most 128.

    Each SOP class is offered with the stored syntaxes, plus both uncompressed ones when any
    stored syntax is uncompressed (so a peer that refuses explicit VR still gets implicit).
    """
    by_class: dict[str, list[str]] = {}
    for sop_class, ts in pairs:
        syntaxes = by_class.setdefault(sop_class, [])
        for candidate in [ts, *UNCOMPRESSED] if UID(ts) in UNCOMPRESSED or not UID(ts).is_compressed else [ts]:
            if candidate not in syntaxes:
                syntaxes.append(candidate)
    contexts = [build_context(sop_class, syntaxes) for sop_class, syntaxes in by_class.items()]
    if len(contexts) > 128:
        raise ValueError(f"{len(contexts)} SOP classes in one request: more than one association can carry")
    return contexts
