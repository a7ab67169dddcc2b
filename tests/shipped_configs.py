"""The shipped proxy examples (``deploy/nginx/gateway-forward-auth.conf``,
``deploy/nginx/replicas.conf``, ``deploy/caddy/Caddyfile``, ``deploy/traefik/dynamic.yml``)
with their addresses replaced, for the tests and the benchmarks that run them for real. Pure
text in, text out: the callers read the files (``NGINX_EXAMPLE``...).

Only the addresses an operator would change (and nginx's auth-cache directory) are replaced;
if an example no longer has what is replaced, :class:`ValueError` says which string, so an
edit of the example cannot silently leave a test or a benchmark on the example's defaults.
"""

from collections.abc import Mapping, Sequence
from pathlib import Path

__all__ = [
    "CADDY_EXAMPLE",
    "NGINX_CACHE_DIR",
    "NGINX_EXAMPLE",
    "REPLICAS_EXAMPLE",
    "TRAEFIK_EXAMPLE",
    "caddy_forward_auth",
    "nginx_forward_auth",
    "nginx_replicas",
    "replaced",
    "traefik_forward_auth",
]

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
NGINX_EXAMPLE = DEPLOY / "nginx" / "gateway-forward-auth.conf"
REPLICAS_EXAMPLE = DEPLOY / "nginx" / "replicas.conf"
CADDY_EXAMPLE = DEPLOY / "caddy" / "Caddyfile"
TRAEFIK_EXAMPLE = DEPLOY / "traefik" / "dynamic.yml"

#: The auth cache directory of the shipped nginx example.
NGINX_CACHE_DIR = "/var/lib/nginx/gateway-auth"


def replaced(text: str, replacements: Mapping[str, str], what: str, *, once: bool) -> str:
    """``text`` with each key replaced by its value; every key must occur (exactly once when
    ``once``), else :class:`ValueError` naming ``what`` and the key."""
    for old, new in replacements.items():
        count = text.count(old)
        if count == 0 or (once and count != 1):
            many = "exactly one" if once else "any"
            raise ValueError(f"{what} no longer has {many} {old!r}")
        text = text.replace(old, new)
    return text


def nginx_forward_auth(text: str, *, port: int, gate: str, app: str, cache_dir: str) -> str:
    """The nginx example listening on ``127.0.0.1:port``, asking the gate at ``gate``
    (``host:port``) and proxying to ``app``, its auth cache in ``cache_dir``."""
    replacements = {
        "listen 80;": f"listen 127.0.0.1:{port};",
        "server 127.0.0.1:8080;": f"server {gate};",
        "server 127.0.0.1:8501;": f"server {app};",
        f"proxy_cache_path {NGINX_CACHE_DIR} ": f"proxy_cache_path {cache_dir} ",
    }
    return replaced(text, replacements, "the nginx example", once=True)


def caddy_forward_auth(text: str, *, port: int, gate: str, app: str) -> str:
    """The Caddyfile serving ``http://127.0.0.1:port``, asking the gate at ``gate`` and
    proxying to ``app`` (both ``host:port``; each address occurs in several directives)."""
    replacements = {
        "app.example.com {": f"http://127.0.0.1:{port} {{",
        "127.0.0.1:8080": gate,
        "127.0.0.1:8501": app,
    }
    return replaced(text, replacements, "the Caddyfile", once=False)


def nginx_replicas(text: str, *, port: int, gates: Sequence[str]) -> str:
    """The replicas example listening on ``127.0.0.1:port`` with its three ``server gate-N``
    lines pointing at ``gates`` (three ``host:port``; the same one thrice is fine)."""
    replacements = {"listen 8080;": f"listen 127.0.0.1:{port};"}
    for i, gate in enumerate(gates, start=1):
        replacements[f"server gate-{i}:8080"] = f"server {gate}"
    return replaced(text, replacements, "the nginx replicas example", once=True)


def traefik_forward_auth(text: str, *, gate: str, app: str) -> str:
    """The Traefik dynamic configuration routing requests for 127.0.0.1 (any port: the entry
    point is Traefik's command line), asking the gate at ``gate`` and proxying to ``app`` (both
    ``host:port``)."""
    replacements = {
        "Host(`app.example.com`)": "Host(`127.0.0.1`)",
        "http://127.0.0.1:8080": f"http://{gate}",
        "http://127.0.0.1:8501": f"http://{app}",
    }
    return replaced(text, replacements, "the Traefik example", once=False)
