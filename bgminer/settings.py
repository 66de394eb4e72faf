"""The one settings surface for running bgminer as a shared server: environment variables
(``BGMINER_*``), optionally mirrored in a ``bgminer.toml``; the environment wins.

A single user on a laptop sets nothing: projects live in ``./projects``, any folder may be
ingested, there is no sign-in and the one user is an admin. See ``docs/deploy.md``.
"""

from __future__ import annotations

import getpass
import ipaddress
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

AUTH_MODES = ("none", "proxy", "oidc")
DEFAULT_PROJECTS_DIR = "projects"
DEFAULT_AUTH_HEADER = "X-Forwarded-Email"
CONFIG_ENV = "BGMINER_CONFIG"  # path of a bgminer.toml; default ./bgminer.toml when it exists
SLUG = re.compile(r"^[a-z0-9][a-z0-9-]{0,47}$")
MAX_IDENTITY = 254  # the longest e-mail address
MiB = 2**20
GiB = 2**30


class SettingsError(ValueError):
    """A setting has a value bgminer cannot use."""


class OutsideDataRoots(PermissionError):
    """An ingest source lies outside every configured data root."""

    reason = "outside_data_roots"


@dataclass(frozen=True)
class Limits:
    """What one visitor can make the server do. Defaults a team server can live with."""

    upload_file_bytes: int = 200 * MiB  # one uploaded file
    upload_submit_bytes: int = 1 * GiB  # one press of "Add uploaded files"
    upload_submit_files: int = 2000  # files in one submit
    project_upload_bytes: int = 20 * GiB  # everything under a project's uploads/
    archive_entries: int = 50_000  # entries in one .zip
    archive_bytes: int = 8 * GiB  # uncompressed size of one .zip
    archive_ratio: float = 200.0  # uncompressed / compressed size of one entry
    disk_reserve_bytes: int = 1 * GiB  # free space every write path leaves on the disk
    max_jobs: int = 2  # heavy jobs (ingest, train, rescore) running at once in one server process
    user_max_epochs: int = 30  # the most epochs a non-admin's (auto-retrain) round may take
    user_modes: tuple[str, ...] = ("adapter",)  # training modes a non-admin's round may use


@dataclass(frozen=True)
class Settings:
    projects_dir: Path | None = None  # BGMINER_PROJECTS_DIR: projects live only there (None: ./projects, not enforced)
    project: str | None = None  # BGMINER_PROJECT: the project the app opens first (a slug or a folder)
    data_roots: tuple[Path, ...] = ()  # BGMINER_DATA_ROOTS: ingest sources must lie inside one (empty: anywhere)
    auth: str = "none"  # BGMINER_AUTH: none | proxy | oidc
    auth_header: str = DEFAULT_AUTH_HEADER  # BGMINER_AUTH_HEADER: the identity header a proxy sets (proxy mode only)
    admins: frozenset[str] = frozenset()  # BGMINER_ADMINS: who may add data, create projects, train and export
    limits: Limits = field(default_factory=Limits)

    # -- projects ------------------------------------------------------------------------
    @property
    def projects_root(self) -> Path:
        """The folder the app lists and creates projects in."""
        return Path(os.path.realpath(self.projects_dir or DEFAULT_PROJECTS_DIR))

    def project_path(self, slug: str) -> Path:
        """The folder of the project called ``slug`` (a short lower-case name, never a path)."""
        if not isinstance(slug, str) or not SLUG.match(slug):
            raise SettingsError(
                f"a project name is 1-48 lower-case letters, digits and dashes, starting with a letter or digit (not {slug!r})"
            )
        return self.projects_root / slug

    def list_projects(self) -> list[str]:
        """Slugs of the projects in :attr:`projects_root`, sorted."""
        root = self.projects_root
        if not root.is_dir():
            return []
        return sorted(
            p.name for p in root.iterdir() if SLUG.match(p.name) and (p / "bgminer.sqlite").is_file() and not p.is_symlink()
        )

    def check_project_folder(self, folder: str | Path) -> Path:
        """``folder`` after realpath, or SettingsError when ``BGMINER_PROJECTS_DIR`` is set and it lies outside."""
        real = Path(os.path.realpath(Path(folder).expanduser()))
        if self.projects_dir is not None and not _inside(real, self.projects_root):
            raise SettingsError(f"{folder} is outside BGMINER_PROJECTS_DIR ({self.projects_root}); projects live only there")
        return real

    def initial_project(self) -> Path | None:
        """The project the app shows first: ``BGMINER_PROJECT`` (a slug or a folder), else the first listed one."""
        if self.project:
            if SLUG.match(self.project):
                return self.project_path(self.project)
            return self.check_project_folder(self.project)
        listed = self.list_projects()
        return self.project_path(listed[0]) if listed else None

    # -- data roots ----------------------------------------------------------------------
    def inside_data_roots(self, path: str | Path) -> bool:
        """Whether ``path`` (after realpath, so symlink targets count) may be read; always true without roots."""
        if not self.data_roots:
            return True
        real = Path(os.path.realpath(Path(path).expanduser()))
        return any(_inside(real, root) for root in self.data_roots)

    def check_data_source(self, path: str | Path) -> Path:
        """``path`` after realpath, or :class:`OutsideDataRoots` (before anything is read from it)."""
        if not self.inside_data_roots(path):
            raise OutsideDataRoots(f"{path} is outside the data roots (BGMINER_DATA_ROOTS); nothing was read from it")
        return Path(os.path.realpath(Path(path).expanduser()))

    # -- people --------------------------------------------------------------------------
    @property
    def signed_in(self) -> bool:
        return self.auth != "none"

    def is_admin(self, user: str | None) -> bool:
        """Without sign-in the one local user is an admin; with it, only the people in ``BGMINER_ADMINS``."""
        if not self.signed_in:
            return True
        return user is not None and user.lower() in self.admins


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def local_user() -> str:
    """The OS user: the author of CLI decisions and of the app's decisions without sign-in."""
    try:
        return getpass.getuser() or "local"
    except (KeyError, OSError):  # no passwd entry (containers)
        return "local"


def clean_identity(raw: str | None) -> str | None:
    """A signed-in identity from a header or token as a safe short string, or None when unusable."""
    if raw is None:
        return None
    value = raw.strip()
    if not value or len(value) > MAX_IDENTITY or any(not ch.isprintable() or ch.isspace() for ch in value):
        return None
    return value


def is_loopback(address: str | None) -> bool:
    """Whether a server bound to ``address`` is reachable from this machine only (empty = every interface)."""
    if not address:
        return False
    if address.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(address.strip().strip("[]")).is_loopback
    except ValueError:
        return False


def serving_problem(address: str | None, settings: Settings) -> str | None:
    """Why the app must refuse to serve on ``address`` (None when it may): no sign-in off loopback."""
    if settings.signed_in or is_loopback(address):
        return None
    where = f"address {address}" if address else "every network interface"
    return (
        f"bgminer refuses to serve on {where} without sign-in: set BGMINER_AUTH=proxy or BGMINER_AUTH=oidc "
        "(see docs/deploy.md), or bind server.address to 127.0.0.1."
    )


# -- loading ------------------------------------------------------------------------------
def _int(text: Any) -> int:
    return int(str(text).replace("_", ""))


def _list(value: Any, sep: str) -> list[str]:
    items = value if isinstance(value, list) else str(value).split(sep)
    return [str(v).strip() for v in items if str(v).strip()]


def _bytes(unit: int) -> Callable[[Any], int]:
    return lambda v: int(float(v) * unit)


# name (env BGMINER_<NAME>, toml <name>) -> (Limits field, parser)
_LIMITS: dict[str, tuple[str, Callable[[Any], Any]]] = {
    "max_upload_mb": ("upload_file_bytes", _bytes(MiB)),
    "max_submit_mb": ("upload_submit_bytes", _bytes(MiB)),
    "max_submit_files": ("upload_submit_files", _int),
    "max_project_uploads_gb": ("project_upload_bytes", _bytes(GiB)),
    "max_archive_entries": ("archive_entries", _int),
    "max_archive_gb": ("archive_bytes", _bytes(GiB)),
    "max_archive_ratio": ("archive_ratio", float),
    "disk_reserve_mb": ("disk_reserve_bytes", _bytes(MiB)),
    "max_jobs": ("max_jobs", _int),
    "user_max_epochs": ("user_max_epochs", _int),
    "user_modes": ("user_modes", lambda v: tuple(_list(v, ","))),
}
_TOP = ("projects_dir", "project", "data_roots", "auth", "auth_header", "admins")


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        import tomllib
    except ModuleNotFoundError as exc:  # Python 3.10
        raise SettingsError(f"reading {path} needs Python 3.11 (tomllib); use BGMINER_* environment variables instead") from exc
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise SettingsError(f"cannot read {path}: {exc}") from exc
    data = data.get("bgminer", data)
    unknown = sorted(set(data) - set(_TOP) - set(_LIMITS))
    if unknown:
        raise SettingsError(f"{path}: unknown setting(s) {', '.join(unknown)}")
    return data


def load_settings(environ: Mapping[str, str] | None = None) -> Settings:
    """Settings from ``bgminer.toml`` (``BGMINER_CONFIG`` or ./bgminer.toml, when present), overridden by ``BGMINER_*``."""
    env = os.environ if environ is None else environ
    raw: dict[str, Any] = {}
    config = env.get(CONFIG_ENV)
    if config or Path("bgminer.toml").is_file():
        raw.update(_read_toml(Path(config or "bgminer.toml")))
    for name in (*_TOP, *_LIMITS):
        value = env.get(f"BGMINER_{name.upper()}")
        if value is not None and value.strip() != "":
            raw[name] = value
    try:
        auth = str(raw.get("auth", "none")).strip().lower()
        if auth not in AUTH_MODES:
            raise SettingsError(f"BGMINER_AUTH must be one of {', '.join(AUTH_MODES)}, not {auth!r}")
        limits = Limits(**{_LIMITS[k][0]: _LIMITS[k][1](v) for k, v in raw.items() if k in _LIMITS})
    except (TypeError, ValueError) as exc:
        raise SettingsError(f"bad bgminer setting: {exc}") from exc
    for f in fields(limits):
        if isinstance(getattr(limits, f.name), (int, float)) and getattr(limits, f.name) < 0:
            raise SettingsError(f"{f.name} must not be negative")
    header = str(raw.get("auth_header", DEFAULT_AUTH_HEADER)).strip()
    if not re.fullmatch(r"[A-Za-z0-9-]{1,64}", header):
        raise SettingsError(f"BGMINER_AUTH_HEADER must be an HTTP header name, not {header!r}")
    return Settings(
        projects_dir=Path(os.path.realpath(Path(str(raw["projects_dir"])).expanduser())) if raw.get("projects_dir") else None,
        project=str(raw["project"]).strip() if raw.get("project") else None,
        data_roots=tuple(Path(os.path.realpath(Path(p).expanduser())) for p in _list(raw.get("data_roots", []), os.pathsep)),
        auth=auth,
        auth_header=header,
        admins=frozenset(a.lower() for a in _list(raw.get("admins", []), ",")),
        limits=limits,
    )
