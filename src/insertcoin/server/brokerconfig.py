"""Mosquitto's password file, ACL and config snippet, written from the database.

Each cabinet logs in as its machineId with the password `cabinet add` printed once (the
database keeps only its `$7$` hash, which is what Mosquitto's password file holds), so
one `%u` pattern confines every cabinet to its own topics. The server logs in with the
user and password of its own MQTT URL.
"""

import os
import re
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select

from insertcoin.protocol.topics import CABINET_PUBLISHES, SERVER_PUBLISHES, Topics
from insertcoin.server.cabinets.credentials import mosquitto_hash
from insertcoin.server.errors import ConfigError
from insertcoin.server.settings import Settings
from insertcoin.server.store.database import Database
from insertcoin.server.store.tables import credentials

PASSWORD_FILE = "insertcoin.passwd"  # noqa: S105 - a file name, not a secret
ACL_FILE = "insertcoin.acl"
# Ends in `.conf` so that `include_dir` loads it; the other two files it ignores.
CONF_FILE = "insertcoin.conf"

_HEADER = "# Written by `insertcoin broker mosquitto-config`: run it again instead of editing.\n"
# Mosquitto splits password lines at ':', skips lines starting with '#', and trims blanks.
_SAFE_USER = re.compile(r"[^#\s:][^\s:]*")


@dataclass(frozen=True)
class MosquittoFiles:
    password_file: Path
    acl_file: Path
    conf_file: Path
    server_user: str
    cabinets: int


def write_mosquitto_config(settings: Settings, db: Database, directory: Path) -> MosquittoFiles:
    """Write the three files into `directory`, each replaced in one step."""
    server_user, server_password = _server_account(settings)
    with db.read() as conn:
        rows = conn.execute(
            select(credentials.c.machine_id, credentials.c.mqtt_password_hash).order_by(
                credentials.c.machine_id
            )
        ).all()
    if any(machine_id == server_user for machine_id, _ in rows):
        raise ConfigError(
            f"INSERTCOIN_MQTT_URL: the server's user {server_user!r} is also a cabinet's "
            "machineId; give the server another user"
        )
    # Absolute: Mosquitto resolves relative paths against its working directory.
    directory = directory.resolve()
    files = MosquittoFiles(
        password_file=directory / PASSWORD_FILE,
        acl_file=directory / ACL_FILE,
        conf_file=directory / CONF_FILE,
        server_user=server_user,
        cabinets=len(rows),
    )
    lines = [f"{server_user}:{mosquitto_hash(server_password)}"]
    lines += [f"{machine_id}:{password_hash}" for machine_id, password_hash in rows]
    try:
        directory.mkdir(parents=True, exist_ok=True)
        _replace(files.password_file, _HEADER + "\n".join(lines) + "\n", 0o600)
        _replace(files.acl_file, _acl(settings.topics(), server_user), 0o644)
        _replace(
            files.conf_file,
            f"{_HEADER}allow_anonymous false\n"
            # Without it a coinpulse or ack can wait out Nagle's algorithm against a
            # delayed ACK: measured here, 20 ms instead of 5 from grant to applied.
            "set_tcp_nodelay true\n"
            f"password_file {files.password_file}\n"
            f"acl_file {files.acl_file}\n",
            0o644,
        )
    except OSError as exc:
        raise ConfigError(f"cannot write into {directory}: {exc.strerror or exc}") from None
    return files


def _server_account(settings: Settings) -> tuple[str, str]:
    target = settings.mqtt_target()
    if target is None or not target.username:
        raise ConfigError(
            "INSERTCOIN_MQTT_URL needs a user for the server account, "
            "e.g. mqtt://insertcoin:SECRET@host:1883"
        )
    if not _SAFE_USER.fullmatch(target.username):
        raise ConfigError(
            f"INSERTCOIN_MQTT_URL: Mosquitto cannot take the user {target.username!r} "
            "(no ':', blanks or leading '#')"
        )
    if not target.password:
        raise ConfigError(
            f"INSERTCOIN_MQTT_URL needs a password for the server account, "
            f"e.g. mqtt://{target.username}:SECRET@host:1883"
        )
    return target.username, target.password


def _acl(topics: Topics, server_user: str) -> str:
    own = f"{topics.prefix}/%u"
    cabinet = "\n".join(
        [f"pattern read {own}/{kind}" for kind in sorted(SERVER_PUBLISHES)]
        + [f"pattern write {own}/{kind}" for kind in sorted(CABINET_PUBLISHES)]
    )
    server = "\n".join(
        [f"topic read {topics.wildcard(kind)}" for kind in sorted(CABINET_PUBLISHES)]
        + [f"topic write {topics.wildcard(kind)}" for kind in sorted(SERVER_PUBLISHES)]
    )
    return f"""{_HEADER}
# Cabinets: each logs in as its machineId, so %u stands for its own topics.
{cabinet}

# The server. Mosquitto checks `read` against the topic of each message it delivers,
# not against the subscription, so these lines cover its $share/insertcoin/...
# subscriptions too (and a cabinet subscribed to # receives only its own topics).
user {server_user}
{server}
"""


def _replace(path: Path, text: str, mode: int) -> None:
    """Write via a temporary file and rename, so a broker reloading meanwhile reads the
    old file or the new one, never half of one. A file that exists keeps its owner,
    group and mode: the operator may have handed it to the broker's user."""
    try:
        kept: os.stat_result | None = path.stat()
    except FileNotFoundError:
        kept = None
    # mkstemp creates the file 0600, so the hashes are never readable by others meanwhile.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        if kept is None:
            os.chmod(tmp, mode)
        else:
            os.chown(tmp, kept.st_uid, kept.st_gid)
            os.chmod(tmp, stat.S_IMODE(kept.st_mode))
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
