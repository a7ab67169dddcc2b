"""The structure the code promises (gateway/__init__.py), checked on the source: no import
cycle between the gateway's modules, the Stripe SDK imported by ``stripe_client``, ``stripe_api``
(its errors) and the webhook verifier ``stripe_webhooks`` alone (and by the demo's Stripe double,
which plays Stripe's side and signs its webhooks with the SDK's own signer), and SQL written only
in ``gateway/store``."""

import ast
import re
from pathlib import Path

import pytest

__all__: list[str] = []

GATEWAY = Path(__file__).resolve().parent.parent / "gateway"


def _modules() -> dict[str, Path]:
    """Dotted module name → file, for every module of the gateway package."""
    out: dict[str, Path] = {}
    for path in sorted(GATEWAY.rglob("*.py")):
        parts = list(path.relative_to(GATEWAY.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _type_checking_only(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imported(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The gateway modules that module ``name`` imports when it runs (at import time or in a
    function; not the ``if TYPE_CHECKING:`` ones, which never run)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _type_checking_only(child):
                for other in child.orelse:
                    visit(other)
                continue
            if isinstance(child, ast.Import):
                found.update(a.name for a in child.names if a.name in modules)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".")[: len(package.split(".")) - child.level + 1]
                    target = ".".join([*base, *([child.module] if child.module else [])])
                else:
                    target = child.module or ""
                for alias in child.names:
                    if f"{target}.{alias.name}" in modules:
                        found.add(f"{target}.{alias.name}")
                    elif target in modules:
                        found.add(target)
            visit(child)

    visit(ast.parse(path.read_text(), str(path)))
    found.discard(name)
    return found


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    for root in edges:
        if root in index:
            continue
        work: list[tuple[str, list[str]]] = [(root, sorted(edges[root]))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, todo = work[-1]
            if todo:
                nxt = todo.pop()
                if nxt not in index:
                    index[nxt] = low[nxt] = len(index)
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, sorted(edges[nxt])))
                elif nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component: list[str] = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    out.append(sorted(component))
    return out


def test_the_cycle_finder_finds_a_cycle() -> None:
    """The check below can fail: a three-module loop and a pair are found, a chain is not."""
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"e"}, "e": {"d"}, "f": {"a"}, "g": set()}
    assert sorted(_cycles(edges)) == [["a", "b", "c"], ["d", "e"]]


def test_no_import_cycle_between_gateway_modules() -> None:
    modules = _modules()
    edges = {name: _imported(name, path, modules) for name, path in modules.items()}
    assert sum(map(len, edges.values())) > 100  # the scan sees the real graph
    assert _cycles(edges) == []


STRIPE_IMPORT = re.compile(r"^\s*(?:import stripe\b|from stripe\b)", re.MULTILINE)
#: The demo's Stripe double is Stripe's side of the wire: it signs webhooks as Stripe does...
STRIPE_SDK_ALLOWED = {
    "gateway/stripe_api.py",
    "gateway/stripe_client.py",
    "gateway/stripe_webhooks.py",
    "gateway/demo/stripe_double/webhooks.py",
    # ...and refuses the parameters Stripe would, by stripe-python's own typed parameters.
    "gateway/demo/stripe_double/params_check.py",
}


def test_only_stripe_api_imports_the_stripe_sdk() -> None:
    importers = {
        str(path.relative_to(GATEWAY.parent))
        for path in _modules().values()
        if STRIPE_IMPORT.search(path.read_text())
    }
    assert {"gateway/stripe_api.py", "gateway/stripe_client.py"} <= importers
    assert importers <= STRIPE_SDK_ALLOWED, importers - STRIPE_SDK_ALLOWED


SQL = re.compile(
    r"\b(?:SELECT\s+[\w*(]|INSERT\s+INTO|DELETE\s+FROM|UPDATE\s+\w+\s+SET|CREATE\s+TABLE"
    r"|ON\s+CONFLICT|LISTEN\s+\w|NOTIFY\s+\w)"
)


def _string_constants(path: Path) -> list[str]:
    """Every string literal of ``path``; an f-string whole, with ``x`` for each ``{…}`` (so
    ``f"SELECT {columns} FROM …"`` reads as SQL, as its pieces alone would not). The store
    writes SQL keywords in upper case (the project's style), which the pattern relies on."""
    out: list[str] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            out.append(node.value)
        elif isinstance(node, ast.JoinedStr):
            out.append(
                "".join(
                    v.value if isinstance(v, ast.Constant) and isinstance(v.value, str) else "x"
                    for v in node.values
                )
            )
    return out


def test_an_f_string_is_read_whole(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text('cols = "a, b"\nq = f"SELECT {cols} FROM customers WHERE id = $1"\n')
    assert [s for s in _string_constants(module) if SQL.search(s)] == [
        "SELECT x FROM customers WHERE id = $1"
    ]


@pytest.mark.parametrize(
    ("text", "is_sql"),
    [
        ("SELECT customer_id FROM customers WHERE email = ?", True),
        ("INSERT INTO sessions (id) VALUES ($1)", True),
        ("UPDATE customers SET email = $2", True),
        ("Select a plan to continue", False),
        ("update your card in the portal", False),
    ],
)
def test_the_sql_pattern(text: str, is_sql: bool) -> None:
    assert bool(SQL.search(text)) is is_sql


def test_sql_is_written_only_in_the_store() -> None:
    store = GATEWAY / "store"
    outside = {
        str(path.relative_to(GATEWAY.parent)): hits
        for path in _modules().values()
        if store not in path.parents
        and (hits := [s for s in _string_constants(path) if SQL.search(s)])
    }
    inside = [s for p in store.glob("*.py") for s in _string_constants(p) if SQL.search(s)]
    assert len(inside) > 20  # the pattern does see the store's SQL
    assert outside == {}
