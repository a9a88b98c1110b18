"""Dropping root after binding (socat's `su=`): the user is looked up when the config is read, so an
unknown name is a configuration error (exit 2) before anything is bound; the change happens once, after
every listener is bound and before `ready`.

Order matters: supplementary groups, then the group, then the user (after setuid nothing else may be
changed). A relay that is not root cannot change user and says so in one line; it never ignores
`su=` silently.
"""

from __future__ import annotations

import grp
import logging
import os
import pwd
from dataclasses import dataclass

from relay.address import AddressError, excerpt

log = logging.getLogger("relay")


@dataclass(frozen=True, slots=True)
class User:
    name: str
    uid: int
    gid: int
    groups: tuple[int, ...]

    def __str__(self) -> str:
        return self.name


def parse_user(value: object) -> User | None:
    """A user name or numeric uid known to this system (/etc/passwd); `none`/empty: stay as started."""
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise AddressError(f"{excerpt(value)} is not a user; expected a user name such as nobody, or a uid")
    text = str(value).strip()
    if text.lower() in ("", "none", "off"):
        return None
    try:
        entry = pwd.getpwuid(int(text)) if text.isascii() and text.isdigit() else pwd.getpwnam(text)
    except (KeyError, OverflowError):
        raise AddressError(
            f"{excerpt(text)} is not a user known here (/etc/passwd); expected a user name such as nobody, "
            "or a uid"
        ) from None
    groups = sorted({entry.pw_gid, *(g.gr_gid for g in grp.getgrall() if entry.pw_name in g.gr_mem)})
    return User(entry.pw_name, entry.pw_uid, entry.pw_gid, tuple(groups))


def drop(user: User | None) -> None:
    """Become `user` (uid, gid, supplementary groups) if started as root; otherwise log why not."""
    if user is None:
        return
    uid = os.geteuid()
    if uid == user.uid and os.getegid() == user.gid:
        log.info("su=%s: already running as %s (uid %d)", user, user, uid)
        return
    if uid != 0:
        log.warning(
            "su=%s is not applied: the relay runs as uid %d, not root, and only root can change user; "
            "it keeps running as uid %d",
            user,
            uid,
            uid,
        )
        return
    os.setgroups(list(user.groups))
    os.setgid(user.gid)
    os.setuid(user.uid)
    log.info("su=%s: now running as uid %d, gid %d, groups %s", user, user.uid, user.gid, list(user.groups))
