"""A real case-insensitive upstream for tests: an Express 4 app with Express's default routing
(case-insensitive, a trailing slash optional), run by ``node`` on 127.0.0.1.

Express comes from the npm registry, installed once per major version into
``.venv/node/express-4`` (the repo's virtualenv: a fresh checkout downloads it once, every later
run reuses it; an install is made in a temporary directory and renamed into place, under a
lock, so concurrent test processes never see half of one). ``node`` and ``npm`` are Debian
packages (``scripts/test`` installs them). Nothing here skips: no ``npm``, no registry or a
failed install fails the test.
"""

import asyncio
import contextlib
import fcntl
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

__all__ = ["EXPRESS_MAJOR", "express_modules", "running_express"]

EXPRESS_MAJOR = "4"
_NODE_DIR = Path(__file__).resolve().parent.parent / ".venv" / "node"
_INSTALL_SECONDS = 300
_START_SECONDS = 30

#: Every route answers its own JSON: the route that matched, the URL as received and the
#: features the gate sent; anything else is a 404 (so a test sees which route Express chose).
_APP = """
const express = require("express");
const app = express();  // the defaults: case-insensitive routing, non-strict trailing slash
const answer = (req, res) => res.json({
  route: req.route.path, url: req.originalUrl, features: req.get("x-gate-features") || ""
});
for (const route of JSON.parse(process.env.ROUTES)) app.all(route, answer);
app.use((req, res) => res.status(404).json({ route: null, url: req.originalUrl }));
const server = app.listen(0, "127.0.0.1", () => {
  console.log("listening " + server.address().port);
});
process.on("SIGTERM", () => server.close(() => process.exit(0)));
"""


def _installed(root: Path) -> bool:
    package = root / "node_modules" / "express" / "package.json"
    try:
        version = json.loads(package.read_text())["version"]
    except (OSError, ValueError, KeyError):
        return False
    return isinstance(version, str) and version.startswith(EXPRESS_MAJOR + ".")


def express_modules() -> Path:
    """The ``node_modules`` directory holding Express (installed on first use; blocking)."""
    root = _NODE_DIR / f"express-{EXPRESS_MAJOR}"
    if _installed(root):
        return root / "node_modules"
    _NODE_DIR.mkdir(parents=True, exist_ok=True)
    with (_NODE_DIR / f".express-{EXPRESS_MAJOR}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not _installed(root):
            staging = Path(tempfile.mkdtemp(dir=_NODE_DIR, prefix=".install-"))
            try:
                done = subprocess.run(
                    ["npm", "install", "--no-audit", "--no-fund", f"express@{EXPRESS_MAJOR}"],
                    cwd=staging,
                    capture_output=True,
                    text=True,
                    timeout=_INSTALL_SECONDS,
                    check=False,
                )
                if done.returncode != 0 or not _installed(staging):
                    raise AssertionError(
                        f"npm install express@{EXPRESS_MAJOR} failed ({done.returncode}):\n"
                        f"{done.stdout[-2000:]}{done.stderr[-2000:]}"
                    )
                shutil.rmtree(root, ignore_errors=True)
                staging.rename(root)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
    return root / "node_modules"


@contextlib.asynccontextmanager
async def running_express(routes: Sequence[str]) -> AsyncIterator[str]:
    """An Express 4 app answering ``routes`` (Express route paths, any method); yields its base
    URL. The app picks its own port and prints it: no port race."""
    modules = await asyncio.to_thread(express_modules)
    workdir = Path(tempfile.mkdtemp(prefix="gate-express-"))
    script = workdir / "app.js"
    script.write_text(_APP)
    env = {**os.environ, "NODE_PATH": str(modules), "ROUTES": json.dumps(list(routes))}
    proc = await asyncio.create_subprocess_exec(
        "node",
        str(script),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        assert proc.stdout is not None
        try:
            line = await asyncio.wait_for(proc.stdout.readline(), _START_SECONDS)
        except TimeoutError:
            raise AssertionError(f"express did not start within {_START_SECONDS} s") from None
        text = line.decode(errors="replace").strip()
        if not text.startswith("listening "):
            rest = await proc.stdout.read()
            raise AssertionError(f"express did not start: {text}\n{rest.decode(errors='replace')}")
        yield f"http://127.0.0.1:{int(text.split()[1])}"
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        shutil.rmtree(workdir, ignore_errors=True)
