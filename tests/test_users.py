"""Users (issue 6 §2; R-SE-1, R-SE-2): passwords, TOTP, lockout, the login decision, the CLI.

The catalog is a real SQLite database; the CLI runs through its entry point as an operator would run it.
The HTTP side (login routes, sessions, roles on every route, IDOR) is in ``test_authz.py``.
"""

from __future__ import annotations

import io
import json
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pyotp
import pytest
from sqlalchemy import select

from gateway.archive.catalog import Catalog
from gateway.archive.schema import audit_log, users
from gateway.cli import main
from gateway.config import UsersSection
from gateway.security import passwords, totp
from gateway.security.login import Logins, Outcome
from gateway.security.permissions import Role
from gateway.security.users import Lockout, UserError, UserStore

GOOD = "Kx8#vmQ2-tRw9p"


@pytest.fixture
def catalog(tmp_path: Path) -> Iterator[Catalog]:
    c = Catalog.open(f"sqlite:///{tmp_path / 'c.db'}")
    yield c
    c.close()


# ---- passwords -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("password", "why"),
    [
        ("Sh0rt!pw", "at least 12"),
        ("alllowercaseletters", "three of"),
        ("Password2024!", "too common"),  # blocklisted word + digits + symbol
        ("Qwerty123456!", "too common"),
        ("Woaini1314!!", "too common"),
        ("Aaaaaaaaaaaa1!", "too common"),  # one repeated character
        ("Abcdefghijk1!", "too common"),  # a sequence
        ("x" * 200 + "A1!", "at most"),
    ],
)
def test_weak_passwords_are_refused_with_the_reason(password: str, why: str) -> None:
    with pytest.raises(passwords.WeakPassword, match=why):
        passwords.check_strength(password)


def test_a_password_may_not_contain_the_user_name() -> None:
    with pytest.raises(passwords.WeakPassword, match="user name"):
        passwords.check_strength("Dr.Wang-Secure9", username="wang")
    passwords.check_strength(GOOD, username="wang")


def test_the_blocklist_ships_with_the_package_and_generated_passwords_pass() -> None:
    assert passwords.BLOCKLIST_FILE.is_file()
    words = passwords.blocklist()
    assert len(words) > 150 and {"123456", "password", "woaini1314", "admin"} <= words
    made = {passwords.generate() for _ in range(20)}
    assert len(made) == 20
    for p in made:
        passwords.check_strength(p)
        assert len(p) == 20


def test_passwords_are_argon2id_hashes_with_rfc9106_parameters() -> None:
    stored = passwords.hash_password(GOOD)
    assert stored.startswith("$argon2id$v=19$m=65536,t=3,p=4$")
    assert passwords.verify(stored, GOOD) and not passwords.verify(stored, GOOD + "x")
    assert not passwords.verify("not a hash", GOOD)


# ---- TOTP ------------------------------------------------------------------------------------------


def test_a_totp_code_is_good_once_in_its_step_or_the_one_before() -> None:
    secret = totp.new_secret()
    assert len(secret) == 32 and totp.provisioning_uri(secret, "admin").startswith(
        "otpauth://totp/ybyx:admin?"
    )
    now = 1_800_000_015.0
    code = pyotp.TOTP(secret).at(now)
    step = totp.matching_step(secret, code, last_step=None, now=now)
    assert step == int(now // 30)
    assert totp.matching_step(secret, code, last_step=step, now=now) is None  # replayed
    earlier = pyotp.TOTP(secret).at(now - 30)
    assert totp.matching_step(secret, earlier, last_step=None, now=now) == step - 1  # clock drift
    assert totp.matching_step(secret, pyotp.TOTP(secret).at(now - 90), last_step=None, now=now) is None
    assert totp.matching_step(secret, "12345", last_step=None, now=now) is None
    assert totp.matching_step(secret, "abcdef", last_step=None, now=now) is None


# ---- accounts --------------------------------------------------------------------------------------


def test_no_default_accounts_and_admins_always_get_totp(catalog: Catalog) -> None:
    store = UserStore(catalog)
    assert store.list() == []  # a fresh node has nobody: the first admin comes from the CLI
    admin, secret = store.create("root-admin", Role.SYSTEM_ADMIN, GOOD)
    assert admin.totp_enrolled and secret is not None
    doctor, none = store.create("dr.li", "doctor", GOOD, institution="H1")
    assert not doctor.totp_enrolled and none is None
    _, enrolled = store.create("dr.zhao", "doctor", GOOD, institution="H1", with_totp=True)
    assert enrolled is not None
    with pytest.raises(UserError, match="belongs to an institution"):
        store.create("dr.nobody", Role.DOCTOR, GOOD)
    with pytest.raises(UserError, match="exists"):
        store.create("dr.li", Role.DOCTOR, GOOD, institution="H1")
    with pytest.raises(UserError, match="role"):
        store.create("x-user", "superuser", GOOD)
    with pytest.raises(passwords.WeakPassword):
        store.create("dr.weak", Role.DOCTOR, "123456", institution="H1")
    with catalog.engine.connect() as conn:
        hashes = list(conn.execute(select(users.c.password_hash)).scalars())
    assert all(h.startswith("$argon2id$") for h in hashes) and GOOD not in "".join(hashes)


def test_lockout_backs_off_doubling_up_to_the_maximum(catalog: Catalog) -> None:
    rule = Lockout(threshold=3, base_seconds=10, max_seconds=35)
    assert [rule.seconds(n) for n in range(1, 7)] == [0, 0, 10, 20, 35, 35]
    store = UserStore(catalog, rule)
    store.create("dr.chen", Role.DOCTOR, GOOD, institution="H1")
    assert [store.record_failure("dr.chen") for _ in range(4)] == [0, 0, 10, 20]
    user = store.get("dr.chen")
    assert user is not None and 19 < user.locked(datetime.now(UTC)) <= 20
    store.record_success(user)
    user = store.get("dr.chen")
    assert user is not None and user.failed_logins == 0 and user.locked(datetime.now(UTC)) == 0


# ---- the login decision ----------------------------------------------------------------------------


def test_login_needs_totp_for_admins_and_for_doctors_from_the_public_internet(catalog: Catalog) -> None:
    logins = Logins(catalog, UsersSection(internal_networks=["10.0.0.0/8"]))
    _, secret = logins.users.create("ops", Role.SYSTEM_ADMIN, GOOD)
    assert secret is not None
    logins.users.create("dr.wu", Role.DOCTOR, GOOD, institution="H1")
    _, dr_secret = logins.users.create("dr.he", Role.DOCTOR, GOOD, institution="H1", with_totp=True)
    assert dr_secret is not None

    assert logins.login("ops", GOOD, None, "10.1.2.3").outcome is Outcome.MFA_REQUIRED  # even inside
    assert logins.login("ops", GOOD, "000000", "10.1.2.3").outcome is Outcome.FAILED
    ok = logins.login("ops", GOOD, pyotp.TOTP(secret).now(), "10.1.2.3")
    assert ok.outcome is Outcome.OK and ok.session is not None and ok.session.session.mfa
    # doctors: inside the hospital network no second factor; from outside it is required
    assert logins.login("dr.wu", GOOD, None, "10.9.9.9").outcome is Outcome.OK
    assert logins.login("dr.wu", GOOD, None, "203.0.113.7").outcome is Outcome.MFA_NOT_ENROLLED
    assert logins.login("dr.he", GOOD, None, "203.0.113.7").outcome is Outcome.MFA_REQUIRED
    assert logins.login("dr.he", GOOD, pyotp.TOTP(dr_secret).now(), "203.0.113.7").outcome is Outcome.OK
    # the switch: never for doctors
    relaxed = Logins(catalog, UsersSection(internal_networks=["10.0.0.0/8"], mfa_doctors="never"))
    assert relaxed.login("dr.wu", GOOD, None, "203.0.113.7").outcome is Outcome.OK


def test_failed_logins_lock_the_account_and_the_address(catalog: Catalog) -> None:
    cfg = UsersSection(lockout_threshold=3, address_lockout_threshold=5, lockout_base_seconds=30)
    logins = Logins(catalog, cfg)
    logins.users.create("dr.sun", Role.DOCTOR, GOOD, institution="H1")
    results = [logins.login("dr.sun", "Wrong-pass-123", None, "10.0.0.1").outcome for _ in range(3)]
    assert results == [Outcome.FAILED, Outcome.FAILED, Outcome.LOCKED]
    locked = logins.login("dr.sun", GOOD, None, "10.0.0.2")  # the right password, another address
    assert locked.outcome is Outcome.LOCKED and 25 < locked.retry_after <= 30
    # one address guessing many accounts (unknown ones too) is locked on its own
    for n in range(4):
        assert logins.login(f"nobody{n}", GOOD, None, "10.6.6.6").outcome is Outcome.FAILED
    assert logins.login("nobody9", GOOD, None, "10.6.6.6").outcome is Outcome.LOCKED
    assert logins.login("dr.other", GOOD, None, "10.6.6.6").reason == "address locked"


def test_an_idle_or_expired_session_ends(catalog: Catalog) -> None:
    logins = Logins(catalog, UsersSection(idle_minutes=10, session_hours=1))
    logins.users.create("dr.gao", Role.DOCTOR, GOOD, institution="H1")
    result = logins.login("dr.gao", GOOD, None, "10.0.0.1")
    assert result.session is not None
    secret, sid = result.session.cookie_secret, result.session.session.session_id
    sessions = logins.sessions
    now = datetime.now(UTC)
    assert sessions.by_cookie(secret, now) is not None and sessions.by_id(sid, now) is not None
    assert sessions.by_cookie(secret, now + timedelta(minutes=11)) is None  # idle
    assert sessions.by_cookie(secret, now + timedelta(minutes=9)) is not None  # touched: idle restarts
    assert sessions.by_cookie(secret, now + timedelta(minutes=61)) is None  # absolute limit
    assert sessions.by_cookie("guessed", now) is None
    assert logins.users.disable("dr.gao")
    assert sessions.by_id(sid) is None  # a disabled account's sessions end at once


# ---- the CLI ---------------------------------------------------------------------------------------


@dataclass
class Ran:
    returncode: int
    stdout: str
    stderr: str


def ybyx(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, *args: str, stdin: str = ""
) -> Ran:
    """``ybyx …`` through the CLI's entry point, in this process (a subprocess costs ~1.5 s)."""
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    code = main(list(args))
    out = capsys.readouterr()
    return Ran(code, out.out, out.err)


def test_create_user_cli_generates_or_reads_a_password_and_audits(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def run(*args: str, stdin: str = "") -> Ran:
        return ybyx(capsys, monkeypatch, *args, stdin=stdin)

    config = tmp_path / "center.toml"
    config.write_text(
        'role = "center"\nprovince = "50"\n[storage]\npath = "blobs"\n[database]\nurl = "sqlite:///c.db"\n',
        encoding="utf-8",
    )
    made = run(
        "admin", "create-user", "root", "--role", "system-admin", "--generate-password", "-c", str(config)
    )
    assert made.returncode == 0, made.stderr
    password = re.search(r"^password\s+(\S+)$", made.stdout, re.M)
    secret = re.search(r"^totp\s+([A-Z2-7]{32})$", made.stdout, re.M)
    assert password and secret and "otpauth://totp/ybyx:root" in made.stdout
    assert "shown this once" in made.stderr
    passwords.check_strength(password.group(1))
    raw = b"".join(p.read_bytes() for p in tmp_path.glob("c.db*"))
    assert password.group(1).encode() not in raw  # only its hash is stored

    weak = run(
        "admin", "create-user", "dr.x", "--role", "doctor", "--institution", "H1", "--password-stdin",
        "-c", str(config), stdin="123456\n",
    )  # fmt: skip
    assert weak.returncode == 2 and "refused" in weak.stderr
    typed = run(
        "admin", "create-user", "dr.x", "--role", "doctor", "--institution", "H1", "--password-stdin",
        "-c", str(config), stdin=GOOD + "\n",
    )  # fmt: skip
    assert typed.returncode == 0, typed.stderr
    assert "password" not in typed.stdout and "totp" not in typed.stdout
    listed = run("admin", "list-users", "-c", str(config))
    assert "root\tsystem-admin\t-\ttotp\tactive" in listed.stdout
    assert "dr.x\tdoctor\tH1\t-\tactive" in listed.stdout
    enrolled = run("admin", "enroll-totp", "dr.x", "-c", str(config))
    assert enrolled.returncode == 0 and re.search(r"^totp\s+[A-Z2-7]{32}$", enrolled.stdout, re.M)
    reset = run("admin", "reset-password", "dr.x", "--generate-password", "-c", str(config))
    assert reset.returncode == 0 and re.search(r"^password\s+\S{20}$", reset.stdout, re.M)
    assert run("admin", "reset-password", "nobody", "--generate-password", "-c", str(config)).returncode == 2
    assert run("admin", "disable-user", "dr.x", "-c", str(config)).returncode == 0

    catalog = Catalog.open(f"sqlite:///{tmp_path / 'c.db'}")
    try:
        with catalog.engine.connect() as conn:
            rows = conn.execute(
                select(audit_log.c.event_type, audit_log.c.resource, audit_log.c.detail).order_by(
                    audit_log.c.seq
                )
            ).all()
    finally:
        catalog.close()
    changes = [(r.resource, r.detail) for r in rows if r.event_type == "config-change"]
    assert [c[0] for c in changes] == ["user:root"] + ["user:dr.x"] * 4
    assert '"action":"create-user"' in changes[0][1] and '"role":"system-admin"' in changes[0][1]
    actions = [json.loads(c[1])["action"] for c in changes[1:]]
    assert actions == ["create-user", "enroll-totp", "reset-password", "disable-user"]
