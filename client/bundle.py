"""Which Flower app bundles (FABs) this hospital will serve: only fedsynth's own, holding no code.

Why: a Flower SuperNode installs the bundle a run names and imports its ClientApp, so whoever can
start a run (the coordinator, or anyone who reaches its Control API) runs code at the hospital.
fedsynth's launch bundle (``fedsynth.deployment.write_launch_app``) carries only a
``pyproject.toml``; the hospital runs the ``client.app`` that its IT installed. So the executor
accepts a bundle only when it is that bundle: the right name, version and components, nothing but
``pyproject.toml`` and Flower's own ``.info`` manifest inside, its hash matching what the
SuperLink said (and, when the hospital pinned hashes, one of those). Nothing from the bundle is
extracted, installed or imported, accepted or not.

Why not Flower's ``--trusted-entities``: it checks that a trusted key signed the bundle, and then
the SuperNode still installs and imports the bundle's code. A signature on code is not what a
hospital wants to approve; "there is no code" is a property it can check itself.
"""

from __future__ import annotations

import hashlib
import io
import tomllib
import zipfile
from dataclasses import dataclass
from typing import Iterable

from protocol.keys import LAUNCH_APP_NAME, LAUNCH_APP_PUBLISHER, LAUNCH_APP_VERSION

LAUNCH_APP_ID = f"{LAUNCH_APP_PUBLISHER}/{LAUNCH_APP_NAME}"
CLIENT_APP_REF = "client.app:app"
MAX_BUNDLE_BYTES = 256 * 1024  # the launch bundle is ~2 kB
ALLOWED_FILES = {"pyproject.toml", ".info/CONTENT"}


class BundleRefused(ValueError):
    """The run's app bundle is not the fedsynth launch app; ``reason`` is a fixed metric label."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class BundleInfo:
    fab_id: str
    fab_version: str
    hash_str: str


def check_bundle(fab_id: str, fab_version: str, hash_str: str, content: bytes,
                 approved_hashes: Iterable[str] = ()) -> BundleInfo:
    """Return the bundle's identity, or raise ``BundleRefused`` saying why it is not ours."""
    approved = {h.strip().lower() for h in approved_hashes if h.strip()}
    if fab_id != LAUNCH_APP_ID:
        raise BundleRefused("name", f"app {fab_id!r} is not {LAUNCH_APP_ID!r}")
    if fab_version != LAUNCH_APP_VERSION:
        raise BundleRefused("version", f"app version {fab_version!r} is not "
                                       f"{LAUNCH_APP_VERSION!r} (this hospital's fedsynth)")
    if len(content) > MAX_BUNDLE_BYTES:
        raise BundleRefused("size", f"app bundle of {len(content)} bytes is larger than a "
                                    f"code-free launch bundle ({MAX_BUNDLE_BYTES} bytes)")
    actual = hashlib.sha256(content).hexdigest()
    if actual != hash_str:
        raise BundleRefused("hash", "app bundle does not match its announced hash")
    if approved and actual not in approved:
        raise BundleRefused("not-approved", f"app bundle {actual[:16]}… is not in this "
                                            "hospital's approved-apps")
    try:
        with zipfile.ZipFile(io.BytesIO(content)) as zf:
            infos = zf.infolist()
            names = {i.filename for i in infos}
            extra = sorted(names - ALLOWED_FILES)
            if extra or len(names) != len(infos):
                raise BundleRefused("code", f"app bundle carries files of its own "
                                            f"({', '.join(extra[:3]) or 'duplicates'}): only "
                                            "pyproject.toml is allowed")
            info = zf.getinfo("pyproject.toml")
            if info.file_size > MAX_BUNDLE_BYTES:
                raise BundleRefused("size", "pyproject.toml of the bundle is too large")
            project = tomllib.loads(zf.read(info).decode())
    except BundleRefused:
        raise
    except (zipfile.BadZipFile, KeyError, UnicodeDecodeError, tomllib.TOMLDecodeError,
            OSError, ValueError) as exc:
        raise BundleRefused("malformed", f"app bundle unreadable ({type(exc).__name__})") from None
    app = project.get("tool", {}).get("flwr", {}).get("app", {})
    components = app.get("components", {}) if isinstance(app, dict) else {}
    if (project.get("project", {}).get("name") != LAUNCH_APP_NAME
            or not isinstance(components, dict)
            or components.get("clientapp") != CLIENT_APP_REF):
        raise BundleRefused("components", f"app bundle does not name {CLIENT_APP_REF!r} as its "
                                          "ClientApp")
    deps = project.get("project", {}).get("dependencies", [])
    if deps:
        raise BundleRefused("code", "app bundle asks for dependencies to be installed")
    return BundleInfo(fab_id, fab_version, actual)
