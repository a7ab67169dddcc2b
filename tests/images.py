"""Building the gate's container image on machines without Docker Hub (see TESTING.md,
"Container images"): a stand-in for ``python:3.11-slim`` made with debootstrap and cached in
podman under a tag keyed on its recipe, a wheelhouse built on the host, and ``podman build``
of the repository's Dockerfile with both. Containers cannot run here (crun refuses cgroups in
hybrid mode), so the image is used by mounting its filesystem and chrooting into it."""

import contextlib
import hashlib
import inspect
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

#: What the stand-in base is made of; its hash is the cache key (change any of it: a new base).
#: ``passwd`` (useradd) and ``ca-certificates`` are in the official slim image too.
BASE_SUITE = "bookworm"
BASE_PACKAGES = ("python3", "python3-venv", "ca-certificates", "passwd")
BASE_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
BASE_REPO = "localhost/gateway-test-base"
DEFAULT_MIRROR = "http://deb.debian.org/debian"

#: Debian packages the image tests need on the host (scripts/test installs them).
HOST_TOOLS = ("podman", "debootstrap")


def run(cmd: Sequence[str | Path], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """Run ``cmd``; on failure raise with its output (the test shows why, not just a code)."""
    proc = subprocess.run(
        [str(c) for c in cmd], capture_output=True, text=True, check=False, **kwargs
    )
    if proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(map(str, cmd))} exited {proc.returncode}\n"
            f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
        )
    return proc


def missing_tools() -> list[str]:
    """The host tools of :data:`HOST_TOOLS` that are not on PATH."""
    return [tool for tool in HOST_TOOLS if shutil.which(tool) is None]


def debian_mirror() -> str:
    """The Debian mirror apt uses on this host (the stand-in base is fetched from it)."""
    for source in (Path("/etc/apt/sources.list.d/debian.sources"), Path("/etc/apt/sources.list")):
        if not source.exists():
            continue
        for line in source.read_text().splitlines():
            words = line.split()
            if words[:1] == ["URIs:"] and len(words) > 1 and "security" not in words[1]:
                return words[1]
            if words[:1] == ["deb"] and len(words) > 2 and "security" not in words[-2]:
                return next(w for w in words[1:] if "://" in w)
    return DEFAULT_MIRROR


def base_tag(mirror: str) -> str:
    """The podman tag of the stand-in base built by this recipe from ``mirror``: keyed on the
    settings above and the code of :func:`ensure_base`, so changing either builds a new one."""
    code = inspect.getsource(ensure_base)
    recipe = json.dumps([BASE_SUITE, BASE_PACKAGES, BASE_ENV, mirror, code])
    return f"{BASE_REPO}:{hashlib.sha256(recipe.encode()).hexdigest()[:16]}"


def image_exists(tag: str) -> bool:
    """Whether podman has an image called ``tag``."""
    return subprocess.run(["podman", "image", "exists", tag], check=False).returncode == 0


def ensure_base() -> str:
    """The stand-in base image's tag; built (debootstrap, a few minutes) only when podman has
    no image for the current recipe."""
    mirror = debian_mirror()
    tag = base_tag(mirror)
    if image_exists(tag):
        return tag
    with tempfile.TemporaryDirectory(prefix="gate-base-") as scratch:
        rootfs = Path(scratch) / "rootfs"
        run(["debootstrap", "--variant=minbase", BASE_SUITE, rootfs, mirror])
        apt_env = {"PATH": BASE_ENV.split("=", 1)[1], "DEBIAN_FRONTEND": "noninteractive"}
        run(["chroot", rootfs, "apt-get", "update", "-qq"], env=apt_env)
        install = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *BASE_PACKAGES]
        run(["chroot", rootfs, *install], env=apt_env)
        run(["chroot", rootfs, "apt-get", "clean"], env=apt_env)
        shutil.rmtree(rootfs / "var/lib/apt/lists", ignore_errors=True)
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        try:
            run(["podman", "import", "--change", f"ENV {BASE_ENV}", "-", tag], stdin=tar.stdout)
        finally:
            assert tar.stdout is not None
            tar.stdout.close()
            assert tar.wait() == 0, "tar of the stand-in rootfs failed"
    return tag


def build_wheelhouse(out: Path) -> Path:
    """Wheels of the gateway and its dependencies, built on the host (pip inside a build
    cannot reach the package index here)."""
    run([sys.executable, "-m", "pip", "wheel", "-q", "--wheel-dir", out, ROOT])
    return out


def build_image(tag: str, base: str, wheelhouse: Path) -> None:
    """``podman build`` the repository's Dockerfile as ``tag`` on ``base``, with the
    gateway and its dependencies from ``wheelhouse`` (the ``offline`` target)."""
    run(
        [
            "podman",
            "build",
            "--isolation=chroot",
            "--network=host",
            "--layers=false",
            "--format=docker",  # OCI images have no HEALTHCHECK
            "--build-arg",
            f"BASE={base}",
            "--target=offline",
            "--build-context",
            f"wheelhouse={wheelhouse}",
            "-t",
            tag,
            "-f",
            ROOT / "Dockerfile",
            ROOT,
        ]
    )


def inspect_image(tag: str) -> dict[str, Any]:
    """``podman image inspect`` of ``tag``."""
    data: list[dict[str, Any]] = json.loads(run(["podman", "image", "inspect", tag]).stdout)
    return data[0]


def remove_image(tag: str) -> None:
    """Remove ``tag`` (an image the test built)."""
    run(["podman", "rmi", "--force", tag])


@contextlib.contextmanager
def mounted(tag: str) -> Iterator[Path]:
    """The image's filesystem, mounted (read-write overlay: writes do not reach the image)."""
    mountpoint = Path(run(["podman", "image", "mount", tag]).stdout.strip())
    try:
        yield mountpoint
    finally:
        run(["podman", "image", "unmount", tag])


def user_ids(rootfs: Path, user: str) -> tuple[int, int]:
    """The UID and GID of the image's ``USER`` (a name or ``uid[:gid]``), from its passwd."""
    name, _, group = user.partition(":")
    for line in (rootfs / "etc/passwd").read_text().splitlines():
        fields = line.split(":")
        if name in (fields[0], fields[2]):
            return int(fields[2]), int(group or fields[3])
    if name.isdigit():
        return int(name), int(group or name)
    raise AssertionError(f"USER {user!r} is not in the image's /etc/passwd")


def image_env(config: dict[str, Any]) -> dict[str, str]:
    """The image's ``ENV`` as a dict."""
    return dict(item.split("=", 1) for item in config.get("Env") or [])


def chroot_cmd(rootfs: Path, uid: int, gid: int, argv: Sequence[str]) -> list[str]:
    """``argv`` run inside ``rootfs`` as ``uid:gid`` (the image's user, as a container would)."""
    return ["chroot", f"--userspec={uid}:{gid}", str(rootfs), *argv]


def healthcheck_argv(info: dict[str, Any]) -> list[str]:
    """The ``HEALTHCHECK`` command of an image (``inspect`` output) as an argv; ``CMD-SHELL``
    goes through /bin/sh. Docker has it in ``Config.Healthcheck``, podman at the top level."""
    check = info["Config"].get("Healthcheck") or info.get("Healthcheck")
    assert check, "the image has no HEALTHCHECK (built without --format=docker?)"
    test: list[str] = check["Test"]
    kind, *rest = test
    if kind == "CMD-SHELL":
        return ["/bin/sh", "-c", *rest]
    assert kind == "CMD", f"unexpected healthcheck {test!r}"
    return rest


def environ_for(image: dict[str, str], extra: dict[str, str]) -> dict[str, str]:
    """A container's environment: the image's ``ENV`` then ``extra`` (``docker run -e``)."""
    return {**image, "HOME": image.get("HOME", "/"), **extra}


def proc_uid(pid: int) -> int:
    """The real UID of process ``pid`` (from /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    raise AssertionError(f"no Uid line for pid {pid}")


def is_root() -> bool:
    """Whether this process may chroot and run rootful podman."""
    return os.geteuid() == 0
