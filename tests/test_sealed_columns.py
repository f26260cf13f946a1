"""Sealed columns (issue 6 §5; R-SE-10, R-SE-14): TOTP secrets and the exam records' personal free
text are ciphertext in the database (SQLite and PostgreSQL), bound to their row, re-wrapped by a KEK
rotation and shredded with the KEK — while logins and the exam API work as before, and what lookups
match on stays plain.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pyotp
import pytest
from sqlalchemy import select, update

from gateway.archive.catalog import Catalog
from gateway.archive.encrypted import DataKeys
from gateway.archive.schema import data_keys, exams, users
from gateway.config import UsersSection
from gateway.exams import SEALED_FIELDS, ExamBook, ExamIn
from gateway.frontend import Frontend
from gateway.identity import write_new_key
from gateway.security.columns import COLUMN_KEY, PREFIX, ColumnCipher, ColumnSealError, seal_existing
from gateway.security.kms import LocalKms
from gateway.security.login import Logins, Outcome
from gateway.security.permissions import Role
from tests.conftest import auth
from tests.test_exams import exam_body
from tests.test_users import Ran, ybyx

GOOD = "Kx8#vmQ2-tRw9p"
PSEUDONYM_KEY = secrets.token_bytes(32)
PLAIN = {"patient_name": "张三", "description": "双肺纹理清晰", "diagnosis": "未见异常"}


@pytest.fixture(params=["sqlite", "postgresql"])
def catalog(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Catalog]:
    url = (
        f"sqlite:///{tmp_path / 'c.db'}"
        if request.param == "sqlite"
        else request.getfixturevalue("fresh_pg_url")
    )
    c = Catalog.open(url)
    yield c
    c.close()


def seal_on(catalog: Catalog, key_file: Path) -> ColumnCipher:
    """Switch column sealing on, as ``Archive.open`` does with ``[encryption] enabled``."""
    kms = LocalKms(key_file, create=not key_file.exists())
    catalog.columns = ColumnCipher(DataKeys(catalog, kms), cache_seconds=0)
    return catalog.columns


def record(catalog: Catalog, accession: str = "ACC-1") -> dict[str, Any]:
    return ExamBook(catalog).record(
        ExamIn(**exam_body("1.2.840.99", accession_number=accession)), key=PSEUDONYM_KEY
    )


def raw(catalog: Catalog, table: Any, where: Any) -> dict[str, Any]:
    with catalog.engine.connect() as conn:
        return dict(conn.execute(select(table).where(where)).one()._mapping)


def test_totp_secret_and_exam_free_text_are_ciphertext_in_the_database(
    catalog: Catalog, tmp_path: Path
) -> None:
    seal_on(catalog, tmp_path / "kek.json")
    logins = Logins(catalog, UsersSection(internal_networks=["10.0.0.0/8"]))
    _, secret = logins.users.create("ops", Role.SYSTEM_ADMIN, GOOD)
    assert secret is not None
    stored = raw(catalog, users, users.c.username == "ops")["totp_secret"]
    assert stored.startswith(PREFIX) and secret not in stored
    assert logins.login("ops", GOOD, pyotp.TOTP(secret).now(), "10.1.2.3").outcome is Outcome.OK

    row = record(catalog)
    assert {k: row[k] for k in PLAIN} == PLAIN and "*" in row["id_masked"]  # the API's view: plain
    db = raw(catalog, exams, exams.c.accession_number == "ACC-1")
    for field in SEALED_FIELDS:
        assert db[field].startswith(PREFIX), field
        assert row[field] not in db[field], field
    # what lookups match on stays plain (QIDO/index/permissions, R-SE-10 scope)
    assert db["person_key"] == row["person_key"] and db["study_uid"] == "1.2.840.99"
    with catalog.engine.connect() as conn:
        assert conn.execute(select(exams.c.id).where(exams.c.person_key == row["person_key"])).first()
        assert conn.execute(select(data_keys.c.blob_key)).scalars().all() == [COLUMN_KEY]  # one key
    forwarded = ExamBook.as_forwarded(ExamBook(catalog).unforwarded()[0])
    assert {k: forwarded[k] for k in PLAIN} == PLAIN and forwarded["id_masked"] == row["id_masked"]


def test_rotation_keeps_columns_readable_and_destruction_shreds_them(tmp_path: Path) -> None:
    catalog = Catalog.open(f"sqlite:///{tmp_path / 'c.db'}")
    key_file = tmp_path / "kek.json"
    cipher = seal_on(catalog, key_file)
    logins = Logins(catalog, UsersSection(internal_networks=["10.0.0.0/8"]))
    _, secret = logins.users.create("ops", Role.SYSTEM_ADMIN, GOOD)
    assert secret is not None
    record(catalog)
    kms = cipher.keys.kms
    first = kms.active()
    # what `ybyx keys rotate` does (gateway/keys_cli.py): new KEK, every data key re-wrapped
    second = kms.generate().key_id
    assert DataKeys(catalog, kms).rewrap(second).rewrapped == 1
    kms.destroy(first)
    cipher.forget_cached_keys()
    assert ExamBook(catalog).unforwarded()[0]["diagnosis"] == PLAIN["diagnosis"]
    assert logins.login("ops", GOOD, pyotp.TOTP(secret).now(), "10.1.2.3").outcome is Outcome.OK

    kms.destroy(second)  # `ybyx keys destroy --yes`: crypto-shredding
    cipher.forget_cached_keys()
    with pytest.raises(ColumnSealError, match="destroyed"):
        ExamBook(catalog).unforwarded()
    # the login is refused, not crashed; the reason is in the log
    assert logins.login("ops", GOOD, pyotp.TOTP(secret).at(0), "10.1.2.3").outcome is Outcome.FAILED
    catalog.close()


def test_a_sealed_value_copied_to_another_row_does_not_open(tmp_path: Path) -> None:
    catalog = Catalog.open(f"sqlite:///{tmp_path / 'c.db'}")
    seal_on(catalog, tmp_path / "kek.json")
    logins = Logins(catalog, UsersSection(internal_networks=["10.0.0.0/8"]))
    _, ops_secret = logins.users.create("ops", Role.SYSTEM_ADMIN, GOOD)
    logins.users.create("ops2", Role.SYSTEM_ADMIN, GOOD)
    assert ops_secret is not None
    record(catalog, "ACC-1")
    record(catalog, "ACC-2")
    with catalog.write() as conn:
        a = conn.execute(select(exams.c.diagnosis).where(exams.c.accession_number == "ACC-1")).scalar_one()
        conn.execute(update(exams).where(exams.c.accession_number == "ACC-2").values(diagnosis=a))
        s = conn.execute(select(users.c.totp_secret).where(users.c.username == "ops")).scalar_one()
        conn.execute(update(users).where(users.c.username == "ops2").values(totp_secret=s))
    with pytest.raises(ColumnSealError, match=r"exams\.diagnosis of H50010300001/ACC-2: .*another row"):
        ExamBook(catalog).unforwarded()
    # the secret copied onto ops2 does not let ops's authenticator log in as ops2
    code = pyotp.TOTP(ops_secret).now()
    assert logins.login("ops2", GOOD, code, "10.1.2.3").outcome is Outcome.FAILED
    catalog.close()


def test_off_is_unchanged_and_plain_values_are_sealed_in_place(tmp_path: Path) -> None:
    catalog = Catalog.open(f"sqlite:///{tmp_path / 'c.db'}")
    logins = Logins(catalog, UsersSection(internal_networks=["10.0.0.0/8"]))
    _, secret = logins.users.create("ops", Role.SYSTEM_ADMIN, GOOD)
    assert secret is not None
    record(catalog)
    assert raw(catalog, users, users.c.username == "ops")["totp_secret"] == secret  # off: as before
    assert raw(catalog, exams, exams.c.accession_number == "ACC-1")["diagnosis"] == PLAIN["diagnosis"]

    cipher = seal_on(catalog, tmp_path / "kek.json")  # switched on: plain values still read
    assert ExamBook(catalog).unforwarded()[0]["diagnosis"] == PLAIN["diagnosis"]
    assert seal_existing(catalog) == 1 + len(SEALED_FIELDS)  # `ybyx keys seal-existing`
    assert seal_existing(catalog) == 0
    assert raw(catalog, users, users.c.username == "ops")["totp_secret"].startswith(PREFIX)
    assert raw(catalog, exams, exams.c.accession_number == "ACC-1")["diagnosis"].startswith(PREFIX)
    assert ExamBook(catalog).unforwarded()[0]["diagnosis"] == PLAIN["diagnosis"]
    assert logins.login("ops", GOOD, pyotp.TOTP(secret).now(), "10.1.2.3").outcome is Outcome.OK

    catalog.columns = None  # switched off again: sealed values are an error, not garbage
    with pytest.raises(ColumnSealError, match="not enabled"):
        ExamBook(catalog).unforwarded()
    assert cipher.keys.counts()  # the column key is in data_keys (rotate/destroy/list see it)
    catalog.close()


def test_exam_api_on_a_sealed_postgresql_front_end(
    start_frontend: Callable[..., Frontend], fresh_pg_url: str, tmp_path: Path
) -> None:
    key_file = tmp_path / "pseudonym.key"
    write_new_key(key_file)
    fe = start_frontend(
        db_url=fresh_pg_url, encryption={"enabled": True}, identity={"key_file": str(key_file)}
    )
    body = exam_body("1.2.840.77")
    r = httpx.post(f"http://127.0.0.1:{fe.http_port}/api/v1/exams", json=body, headers=auth(fe), timeout=10)
    assert r.status_code == 201, r.text
    masked = r.json()["id_masked"]
    assert masked.startswith(body["id_number"][:4]) and "*" in masked
    catalog = fe.archive.catalog
    db = raw(catalog, exams, exams.c.accession_number == "ACC-1")
    assert all(db[f].startswith(PREFIX) for f in SEALED_FIELDS)
    assert masked not in db["id_masked"] and body["id_number"] not in str(db)
    out = ExamBook(catalog).unforwarded()[0]
    assert out["diagnosis"] == body["diagnosis"] and out["id_masked"] == masked


def test_admin_and_keys_cli_seal_rotate_and_shred_the_totp_secret(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The operator's path: ``ybyx admin create-user`` stores the secret sealed; ``ybyx keys rotate``
    keeps it usable; ``ybyx keys destroy`` of the KEK wrapping it refuses TOTP logins."""

    def run(*args: str, stdin: str = "") -> Ran:
        return ybyx(capsys, monkeypatch, *args, stdin=stdin)

    config = tmp_path / "center.toml"
    key_file = tmp_path / "kek.json"
    config.write_text(
        f'role = "center"\nprovince = "50"\n[storage]\npath = "{tmp_path / "blobs"}"\n'
        f'[database]\nurl = "sqlite:///{tmp_path / "c.db"}"\n'
        f'[encryption]\nenabled = true\nkey_file = "{key_file}"\n',
        encoding="utf-8",
    )
    made = run(
        "admin", "create-user", "root", "--role", "system-admin", "--password-stdin", "-c", str(config),
        stdin=GOOD + "\n",
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    found = re.search(r"^totp\s+([A-Z2-7]{32})$", made.stdout, re.M)
    assert found
    secret = found.group(1)
    assert secret.encode() not in b"".join(p.read_bytes() for p in tmp_path.glob("c.db*"))

    catalog = Catalog.open(f"sqlite:///{tmp_path / 'c.db'}")
    seal_on(catalog, key_file)
    logins = Logins(catalog, UsersSection(internal_networks=["10.0.0.0/8"]))
    assert raw(catalog, users, users.c.username == "root")["totp_secret"].startswith(PREFIX)
    first = LocalKms(key_file).active()
    rotated = run("keys", "rotate", "-c", str(config))
    assert rotated.returncode == 0 and "re-wrapped 1 data keys" in rotated.stdout, rotated.stderr
    assert run("keys", "destroy", first, "-c", str(config)).returncode == 0  # nothing depends on it now
    assert logins.login("root", GOOD, pyotp.TOTP(secret).now(), "10.1.2.3").outcome is Outcome.OK
    second = LocalKms(key_file).active()
    refused = run("keys", "destroy", second, "-c", str(config))
    assert refused.returncode == 2 and "1 stored objects" in refused.stderr  # the column key counts
    assert run("keys", "destroy", second, "-c", str(config), "--yes").returncode == 0
    assert logins.login("root", GOOD, pyotp.TOTP(secret).now(), "10.1.2.3").outcome is Outcome.FAILED
    catalog.close()
