"""Roles and the permission table: role × action × resource kind (R-SE-2, R-SE-3, R-SE-16; issue 6 §3).

The *action* of a request is the name the guard's :data:`~gateway.security.guard.RULES` table gives
its route (``qido``, ``wado``, ``api:forwarding`` …) — the same name a node client needs as an OAuth
scope. A node client is checked against the scopes of its token; a user against :data:`PERMISSIONS`
here, by role (:meth:`gateway.security.guard.Guard._allowed`). Each action acts on one *resource
kind* (:data:`ACTION_KINDS`); a permission also says *how far* it reaches (:class:`Reach`): every
resource of the kind on this node, those of the user's institution, or only the user's own.

Least privilege (R-SE-2): the system administrator runs the system (metrics, forwarding, upload
monitoring) but reads no images; the institution administrator sees the operations of their
institution; doctors search and read images of their institution (and, later, of patients who
granted them access: :mod:`gateway.security.resources`); patients only their own studies; the
auditor only the audit trail. Nothing is allowed that is not listed.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Role(StrEnum):
    """The user roles of R-SE-2 (plus the auditor of R-SE-4)."""

    SYSTEM_ADMIN = "system-admin"  # 系统管理员
    INSTITUTION_ADMIN = "institution-admin"  # 机构管理员
    DOCTOR = "doctor"  # 医生
    PATIENT = "patient"  # 个人 (the insured person)
    AUDITOR = "auditor"  # 审计员


#: Roles that must log in with a second factor, always (R-SE-1).
ADMIN_ROLES = frozenset({Role.SYSTEM_ADMIN, Role.INSTITUTION_ADMIN})
#: Roles bound to one institution (their account names it; it scopes what they see).
INSTITUTION_ROLES = frozenset({Role.INSTITUTION_ADMIN, Role.DOCTOR})


class Kind(StrEnum):
    """What an action acts on."""

    STUDY = "study"  # images and their DICOM headers (QIDO, WADO, STOW)
    EXAM_RECORD = "exam-record"  # exam and settlement records from the HIS (personal data, reports)
    OPERATIONS = "operations"  # forwarding state, upload monitoring, metrics
    NODE = "node"  # what only another node asks (inventory, manifest)
    AUDIT = "audit"  # the audit trail
    SESSION = "session"  # the caller's own login session


class Reach(StrEnum):
    """How far a permission reaches over the resources of its kind."""

    ALL = "all"  # everything of that kind on this node
    INSTITUTION = "institution"  # the user's institution's (plus grants, resources.py)
    OWN = "own"  # the user's own (a patient's own studies; one's own session)


#: Actions only a logged-in user has (never granted to a node client as a scope).
SELF = "self"
AUDIT_READ = "audit:read"

#: The resource kind of each action (every action of guard.RULES must be here: tested).
ACTION_KINDS: dict[str, Kind] = {
    "stow": Kind.STUDY,
    "qido": Kind.STUDY,
    "wado": Kind.STUDY,
    "api:exams": Kind.EXAM_RECORD,
    "api:forwarding": Kind.OPERATIONS,
    "api:monitoring": Kind.OPERATIONS,
    "metrics": Kind.OPERATIONS,
    "api:send": Kind.STUDY,  # one-click send of a study the user may read (api/send.py checks it)
    "api:codes": Kind.OPERATIONS,  # the exam-item code maps of a front-end (R-CE-4)
    "api:codes:write": Kind.OPERATIONS,
    # the doctor workstation (api/doctor.py, R-RT-1..3, R-VW-3): history, reminders, citations, fetch
    "api:doctor": Kind.EXAM_RECORD,
    "api:inventory": Kind.NODE,
    "api:manifest": Kind.NODE,
    AUDIT_READ: Kind.AUDIT,
    SELF: Kind.SESSION,
}


@dataclass(frozen=True)
class Permission:
    role: Role
    action: str
    kind: Kind
    reach: Reach


def _p(role: Role, reach: Reach, *actions: str) -> list[Permission]:
    return [Permission(role, a, ACTION_KINDS[a], reach) for a in actions]


_R = Role
#: The one table. Uploads (STOW-RS, exam records) come from modalities, PACS and the HIS as node
#: clients, never from a person's account; node-to-node actions are not given to any user.
PERMISSIONS: tuple[Permission, ...] = (
    *_p(_R.SYSTEM_ADMIN, Reach.ALL, "metrics", "api:forwarding", "api:monitoring"),
    *_p(_R.INSTITUTION_ADMIN, Reach.INSTITUTION, "api:forwarding", "api:monitoring"),
    # the code maps (R-CE-4): the front-end's own institution's admins, and the system admin
    *_p(_R.SYSTEM_ADMIN, Reach.ALL, "api:codes", "api:codes:write"),
    *_p(_R.INSTITUTION_ADMIN, Reach.INSTITUTION, "api:codes", "api:codes:write"),
    *_p(_R.DOCTOR, Reach.INSTITUTION, "qido", "wado"),
    # one-click send (R-VW-1 u): to their institution's workstations, of studies they may read
    *_p(_R.DOCTOR, Reach.INSTITUTION, "api:send"),
    # the doctor workstation of their hospital's front-end, as themselves (the session names the
    # doctor; each patient's data still needs that patient's grant, R-RT-4)
    *_p(_R.DOCTOR, Reach.INSTITUTION, "api:doctor"),
    *_p(_R.PATIENT, Reach.OWN, "qido", "wado"),
    *_p(_R.AUDITOR, Reach.ALL, AUDIT_READ),
    *(p for role in Role for p in _p(role, Reach.OWN, SELF)),
)

_TABLE: dict[tuple[Role, str], Permission] = {(p.role, p.action): p for p in PERMISSIONS}


def permission(role: Role | str, action: str) -> Permission | None:
    """The permission ``role`` has for ``action``, or None (denied)."""
    try:
        return _TABLE.get((Role(role), action))
    except ValueError:  # a role this version does not know: nothing
        return None


def allows(role: Role | str, action: str) -> bool:
    return permission(role, action) is not None


def actions_of(role: Role | str) -> frozenset[str]:
    """Every action ``role`` may perform (whoami shows it; docs list it)."""
    return frozenset(a for (r, a) in _TABLE if r == Role(role))
