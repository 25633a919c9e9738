"""The package's shape: no import cycle among perce_ds modules, imports point down the layers, no module past the
size a reader can hold.

Imports are read from the source (module level and inside functions alike: a function-level import that closes
a cycle is a cycle that merely fails later), so the check needs nothing installed beyond the standard library.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "perce_ds"
MAX_MODULE_LINES = 450
# Bottom to top. A module may import its own layer and the layers below, never a layer above. A module in no
# layer (a new one) is unconstrained until it is placed here; the cycle test still covers it.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("ground floor", ("perce_ds", "perce_ds.errors", "perce_ds.profiling", "perce_ds.logging_utils",
                      "perce_ds.fingerprints", "perce_ds.distributed", "perce_ds.preemption",
                      "perce_ds.metric_presets", "perce_ds.export_check", "perce_ds.checkpoint", "perce_ds.best")),
    ("loss", ("perce_ds.loss",)),
    ("config", ("perce_ds.config",)),
    ("data and model", ("perce_ds.data", "perce_ds.data.*", "perce_ds.model", "perce_ds.ds_config", "perce_ds.lora")),
    ("evaluation", ("perce_ds.evaluation", "perce_ds.evaluation.*")),
    ("engine and entry points", ("perce_ds.engine", "perce_ds.estep", "perce_ds.insight", "perce_ds.dryrun",
                                 "perce_ds.cli")),
    ("sweeps", ("perce_ds.sweep", "perce_ds.sweep.*")),
]  # fmt: skip


def module_name(path: Path, package: Path = PACKAGE) -> str:
    return ".".join(path.relative_to(package.parent).with_suffix("").parts).removesuffix(".__init__")


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """Module -> the modules of the same package it imports (`from a import b` counts a.b when b is a module)."""
    modules = {module_name(p, package): p for p in package.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                targets = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            graph[name] |= {t for t in targets if t in modules and t != name}
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        cycles.append(sorted(component))
            elif child not in index:
                index[child] = low[child] = len(index)
                stack.append(child)
                on_stack.add(child)
                work.append((child, iter(sorted(graph[child]))))
            elif child in on_stack:
                low[node] = min(low[node], index[child])
    return cycles


def layer_of(module: str, layers: list[tuple[str, tuple[str, ...]]] = LAYERS) -> int | None:
    """Index of the layer holding `module` ("pkg.sub.*" holds every module below pkg.sub), None if unplaced."""
    for i, (_, members) in enumerate(layers):
        for member in members:
            if module == member or (member.endswith(".*") and module.startswith(member[:-1])):
                return i
    return None


def upward_imports(graph: dict[str, set[str]], layers: list[tuple[str, tuple[str, ...]]] = LAYERS) -> list[str]:
    """Each import from a layer up to a higher one, as "a (layer) -> b (layer)"."""
    found = []
    for module in sorted(graph):
        low = layer_of(module, layers)
        for target in sorted(graph[module]):
            high = layer_of(target, layers)
            if low is not None and high is not None and high > low:
                found.append(f"{module} ({layers[low][0]}) -> {target} ({layers[high][0]})")
    return found


def test_the_cycle_finder_finds_a_planted_cycle():
    """The check can fail: a -> b -> c -> a is found, the d -> a tail and the lone e are not part of it."""
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert import_cycles(graph) == [["a", "b", "c"]]
    assert import_cycles({"a": {"b"}, "b": set()}) == []


def test_the_import_graph_reads_function_level_imports(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("import os\nfrom pkg.sub import b\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    import pkg.a\n    return pkg.a\n")
    graph = import_graph(pkg)
    assert graph["pkg.a"] == {"pkg.sub", "pkg.sub.b"} and graph["pkg.sub.b"] == {"pkg.a"}
    assert import_cycles(graph) == [["pkg.a", "pkg.sub.b"]]
    assert len(import_graph()) > 30  # the real package is read


def test_no_import_cycle_among_perce_ds_modules():
    assert import_cycles(import_graph()) == []


def test_every_module_stays_under_the_size_limit():
    sizes = {module_name(p): len(p.read_text().splitlines()) for p in PACKAGE.rglob("*.py")}
    too_long = {m: n for m, n in sizes.items() if n > MAX_MODULE_LINES}
    assert not too_long, f"split these modules (limit {MAX_MODULE_LINES} lines): {too_long}"


def test_the_layer_check_finds_a_planted_upward_import():
    """The check can fail: config importing evaluation and checkpoint importing config (the two arrows it was
    written for) are found; downward imports and unplaced modules are not flagged."""
    graph = {
        "perce_ds.config": {"perce_ds.loss", "perce_ds.evaluation.metrics"},
        "perce_ds.checkpoint": {"perce_ds.config"},
        "perce_ds.evaluation.metrics": {"perce_ds.metric_presets"},
        "perce_ds.engine": {"perce_ds.config", "perce_ds.someday"},
        "perce_ds.someday": {"perce_ds.engine"},
    }
    assert upward_imports(graph) == [
        "perce_ds.checkpoint (ground floor) -> perce_ds.config (config)",
        "perce_ds.config (config) -> perce_ds.evaluation.metrics (evaluation)",
    ]


def test_every_layered_module_exists_and_imports_point_down():
    graph = import_graph()
    assert upward_imports(graph) == []
    stale = [m for _, members in LAYERS for m in members if not m.endswith(".*") and m not in graph]
    assert not stale, f"LAYERS names modules that no longer exist: {stale}"


ROOT = PACKAGE.parent
# A project document cited in code: an upper-case name (README.md) or a page under docs/. Lower-case names such as
# report.md are files the code writes, not citations.
CITED_DOC = re.compile(r"(?<![\w./-])((?:docs/[\w./-]+|(?:[\w-]+/)*[A-Z][A-Z0-9_]*)\.md)\b")


def cited_documents(text: str) -> set[str]:
    return set(CITED_DOC.findall(text))


def test_cited_documents_are_read_as_citations():
    missing = "METHOD" + ".md"  # spelt apart so that the scan below does not read this file as citing it
    text = f"see docs/method.md and {missing}, benchmarks/RESULTS.md; writes report.md and <run>/compare.md"
    assert cited_documents(text) == {"docs/method.md", missing, "benchmarks/RESULTS.md"}


def test_every_document_the_code_cites_is_in_the_repository():
    """A comment or docstring that points at a document points at one a reader of this repository can open."""
    files = [p for d in ("perce_ds", "launch", "tests", "benchmarks") for p in (ROOT / d).rglob("*.py")]
    docs = {p.relative_to(ROOT).as_posix() for p in ROOT.rglob("*.md") if ".venv" not in p.parts}
    missing = {}
    for path in files:
        for cited in cited_documents(path.read_text()):
            if cited not in docs and not any(d.endswith("/" + cited) for d in docs):
                missing.setdefault(cited, []).append(path.relative_to(ROOT).as_posix())
    assert len(files) > 50 and "README.md" in docs  # the real repository is read
    assert not missing, f"cited documents not in the repository: {missing}"
