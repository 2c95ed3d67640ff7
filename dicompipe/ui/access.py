"""Who may use the web app and what it may read: data roots, sign-in, per-user folders.

Plain functions (no Streamlit) shared by the launcher (``dicompipe ui``) and the app. The
launcher checks the settings, then hands them to the Streamlit process in environment
variables (never on a command line):

- ``DICOMPIPE_UI_DATA_ROOTS``: the allowed server folders (``os.pathsep``-separated, real
  paths); without one the app offers uploads only.
- ``DICOMPIPE_UI_TOKEN``: one access token shared by the team (each user types a name), or
- ``DICOMPIPE_UI_TOKEN_FILE``: a file of ``user:token`` lines (one token per user) or a
  single line holding the shared token; ``#`` starts a comment.
- ``DICOMPIPE_UI_AUTH=oidc``: Streamlit's built-in sign-in (``st.login``, ``[auth]`` in
  ``.streamlit/secrets.toml``).
- ``DICOMPIPE_UI_INSECURE=1``: reachable by others with no sign-in (``--insecure-no-auth``).

Example::

    >>> roots = parse_roots(["/data/ct"])
    >>> resolve_in_roots("/data/ct/case-001", roots)     # the real path, or AccessDenied
    PosixPath('/data/ct/case-001')
    >>> check_launch("0.0.0.0", Settings())               # raises: no sign-in configured
"""
from __future__ import annotations

import hmac
import ipaddress
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path

from dicompipe.errors import DicompipeError

ROOTS_ENV = "DICOMPIPE_UI_DATA_ROOTS"
TOKEN_ENV = "DICOMPIPE_UI_TOKEN"
TOKEN_FILE_ENV = "DICOMPIPE_UI_TOKEN_FILE"
AUTH_ENV = "DICOMPIPE_UI_AUTH"
INSECURE_ENV = "DICOMPIPE_UI_INSECURE"
MIN_TOKEN = 16                       # characters; shorter tokens are refused at start
USER_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+-]{0,63}")

INSECURE_BANNER = ("NO SIGN-IN: this dicompipe server is reachable from other machines and "
                   "anyone who can reach it can analyse data and read every case "
                   "(--insecure-no-auth).")


class AccessDenied(DicompipeError):
    """A server path outside the allowed data folders (or missing: the same message)."""


@dataclass(frozen=True)
class Settings:
    """What the app enforces. ``mode``: "open" (local, no sign-in), "token", "oidc", "insecure"."""

    roots: tuple[Path, ...] = ()
    shared_token: str | None = None
    user_tokens: dict = field(default_factory=dict)
    oidc: bool = False
    insecure: bool = False

    @property
    def mode(self) -> str:
        if self.shared_token or self.user_tokens:
            return "token"
        return "oidc" if self.oidc else "insecure" if self.insecure else "open"

    @property
    def hide_paths(self) -> bool:
        """Server paths outside the roots are hidden unless the app is private and local."""
        return self.mode != "open" or bool(self.roots)


# --------------------------------------------------------------------------- settings
def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses; ``""``/``0.0.0.0``/``::`` mean every
    interface. Example: ``is_loopback("127.0.0.1") -> True``, ``is_loopback("0.0.0.0") -> False``."""
    host = (host or "").strip().strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False                                   # a host name: assume reachable


def parse_roots(dirs) -> tuple[Path, ...]:
    """The real paths of ``--data-root`` folders; :class:`DicompipeError` for a bad one
    (told to the operator at start, so it may name the folder)."""
    out = []
    for d in dirs or ():
        real = Path(os.path.realpath(os.path.expanduser(str(d))))
        if not real.is_dir():
            raise DicompipeError(f"--data-root {d}: not a folder on this server.")
        if real == Path(real.anchor):
            raise DicompipeError(f"--data-root {d}: the whole file system cannot be a data root.")
        out.append(real)
    return tuple(dict.fromkeys(out))


def read_token_file(path) -> tuple[str | None, dict[str, str]]:
    """``(shared token, {user: token})`` from a token file (see the module doc)."""
    p = Path(path).expanduser()
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeError) as e:
        raise DicompipeError(f"Cannot read the token file {p}: {getattr(e, 'strerror', None) or e}.") from e
    entries = [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]
    users: dict[str, str] = {}
    for i, ln in enumerate(entries, 1):
        user, sep, token = ln.partition(":")
        if not sep:
            if len(entries) == 1:
                return _token_ok(user, p), {}
            raise DicompipeError(f"Token file {p}: entry {i} is not a user:token line.")
        user = user.strip()
        if not USER_RE.fullmatch(user):
            raise DicompipeError(f"Token file {p}: entry {i}: user names are letters, digits "
                                 "and . _ @ + - (up to 64).")
        users[user] = _token_ok(token.strip(), p)
    if not users:
        raise DicompipeError(f"Token file {p} holds no token.")
    return None, users


def _token_ok(token: str, where) -> str:
    if len(token) < MIN_TOKEN:
        raise DicompipeError(f"The access token from {where} is shorter than {MIN_TOKEN} "
                             "characters; use e.g. python -c \"import secrets; "
                             "print(secrets.token_urlsafe(24))\".")
    return token


def from_env(env=None) -> Settings:
    """The settings the launcher left in the environment (``os.environ`` by default)."""
    env = os.environ if env is None else env
    roots = tuple(Path(r) for r in (env.get(ROOTS_ENV) or "").split(os.pathsep) if r)
    shared, users = None, {}
    if env.get(TOKEN_FILE_ENV):
        shared, users = read_token_file(env[TOKEN_FILE_ENV])
    elif env.get(TOKEN_ENV):
        shared = _token_ok(env[TOKEN_ENV], TOKEN_ENV)
    return Settings(roots=parse_roots(roots), shared_token=shared, user_tokens=users,
                    oidc=env.get(AUTH_ENV, "") == "oidc",
                    insecure=env.get(INSECURE_ENV, "") in ("1", "true", "yes"))


def oidc_problem(cwd=None) -> str | None:
    """Why Streamlit's built-in sign-in cannot be used here, or None when it can."""
    import importlib.util
    try:
        import streamlit as st
    except ImportError:
        return "Streamlit is not installed"
    if not (hasattr(st, "login") and hasattr(st, "user")):
        return f"the installed Streamlit {st.__version__} has no st.login (1.42 or newer has)"
    if importlib.util.find_spec("authlib") is None:
        return "st.login needs Authlib: pip install 'Authlib>=1.3.2'"
    import tomllib
    for f in (Path(cwd or ".") / ".streamlit" / "secrets.toml",
              Path.home() / ".streamlit" / "secrets.toml"):
        try:
            auth = tomllib.loads(f.read_text(encoding="utf-8")).get("auth") or {}
        except (OSError, ValueError):
            continue
        if auth.get("redirect_uri") and auth.get("cookie_secret"):
            return None
    return ("no [auth] section with redirect_uri and cookie_secret in .streamlit/secrets.toml "
            "(here or in your home folder)")


def check_launch(host: str, settings: Settings) -> list[str]:
    """Refuse (:class:`DicompipeError`) to serve others without sign-in; return warnings.

    Example: ``check_launch("0.0.0.0", Settings())`` raises; ``check_launch("localhost",
    Settings())`` returns ``[]``.
    """
    warnings = []
    if not is_loopback(host):
        if settings.mode == "open":
            raise DicompipeError(
                f"Refusing to serve on {host!r} without sign-in: anyone who can reach this "
                f"machine could analyse its data and read every case. Set {TOKEN_ENV} (or "
                "--token-file FILE), or use --oidc with Streamlit's sign-in, or pass "
                "--insecure-no-auth if this network is trusted. See 'Running dicompipe ui for "
                "a team' in the README.")
        warnings.append(f"listening on {host}: reachable from other machines. The traffic "
                        "(tokens included) is plain HTTP: put a TLS reverse proxy in front.")
    if settings.mode == "insecure":
        warnings.append(INSECURE_BANNER)
    if settings.mode != "open" and not settings.roots:
        warnings.append("no --data-root: users can upload only (the server-folder input is "
                        "hidden).")
    return warnings


def token_file_warning(path) -> str | None:
    """A warning when the token file can be read by other local users."""
    try:
        mode = Path(path).expanduser().stat().st_mode
    except OSError:
        return None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        return f"the token file {path} is readable by other users: chmod 600 {path}"
    return None


# --------------------------------------------------------------------------- sign-in
def check_sign_in(settings: Settings, user: str, token: str) -> str | None:
    """The user id for a correct user name + token, else None (constant-time compare).

    Example: ``check_sign_in(Settings(shared_token=t), "alice", t) -> "alice"``.
    """
    user = (user or "").strip()
    if not USER_RE.fullmatch(user) or not token:
        return None
    given = token.encode("utf-8")
    if settings.user_tokens:
        ok = False
        for name, secret in settings.user_tokens.items():     # no early exit
            ok |= hmac.compare_digest(given, secret.encode("utf-8")) and name == user
        return user if ok else None
    if settings.shared_token and hmac.compare_digest(given, settings.shared_token.encode("utf-8")):
        return user
    return None


def user_from_claims(claims: dict) -> str | None:
    """A user id from Streamlit's ``st.user`` (OIDC): the e-mail, else the subject."""
    uid = str(claims.get("email") or claims.get("sub") or "").strip()
    return uid or None


def user_folder(user: str) -> str:
    """A folder name for ``user`` (``alice@lab.org`` -> ``alice@lab.org``; odd characters
    replaced, never ``..`` or a separator)."""
    name = re.sub(r"[^A-Za-z0-9._@+-]", "_", user)[:64].lstrip(".") or "_"
    return name


# --------------------------------------------------------------------------- data roots
def _within(path: Path, roots) -> bool:
    return any(path == r or r in path.parents for r in roots)


def refused(text: str, roots) -> AccessDenied:
    """The one message for a path that is outside the roots, missing or unreadable."""
    return AccessDenied(f"“{text}” is not a folder or file inside the allowed data folders "
                        f"({', '.join(str(r) for r in roots)}). Give a path inside one of them.")


def resolve_in_roots(text: str, roots) -> Path:
    """The real path of ``text`` (absolute, or relative to a root) when it exists inside a
    root; :class:`AccessDenied` otherwise (``..`` or links leaving the roots included), with
    the same message whether or not the path exists."""
    text = (text or "").strip()
    if not roots or not text or "\x00" in text:
        raise refused(text, roots)
    cands = [Path(text)] if os.path.isabs(text) else [r / text for r in roots]
    for c in cands:
        real = Path(os.path.realpath(c))
        if _within(real, roots) and os.access(real, os.R_OK) and real.exists():
            return real
    raise refused(text, roots)


def escaping_files(candidates, roots) -> list[str]:
    """Existing files of discovered series that resolve outside the roots (a link inside
    the folder pointing elsewhere, a DICOMDIR naming files outside); empty when all is inside."""
    out = []
    for s in candidates:
        for i in getattr(s, "instances", ()) or ():
            f = getattr(i, "file", None)
            real = Path(os.path.realpath(f)) if f else None
            if real is not None and not _within(real, roots) and real.exists():
                out.append(str(f))
    return out


_PATH = re.compile(r"(?<![\w.:/~-])/[^\s'\"(),;:<>|*?]+")


def scrub(text: str, roots=()) -> str:
    """``text`` with absolute server paths outside ``roots`` cut to their last part.

    Example: ``scrub("cannot open /home/lab/db.sqlite") -> "cannot open …/db.sqlite"``.
    """
    def one(m):
        p = m.group(0).rstrip(".")
        tail = m.group(0)[len(p):]
        if roots and _within(Path(os.path.realpath(p)), roots):
            return m.group(0)
        return "…/" + (Path(p).name or "") + tail
    return _PATH.sub(one, str(text))
