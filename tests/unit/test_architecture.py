"""The import rules of ARCHITECTURE.md, checked on the real files (parsed with ast, nothing imported or run).

    core/         imports nothing of ours above it, and neither torch.distributed nor nvidia.dali
    distributed/  and export/ import core/, never each other (they meet through files on disk)
    export/serve/ reaches the model only through export.runtime's public API (the package, not its modules)
    bench/        imports only public names (nothing that starts with "_"; export.runtime's package or its command)
    ray           imported only by export/runtime/batch/ (Ray is the optional [scale] extra)
    product code  never imports tests/, and no import cycle anywhere (imports inside functions count too)
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("core", "distributed", "export", "bench", "tools")
OURS = (*PACKAGES, "tests")


@dataclass(frozen=True)
class Import:
    importer: str  # module name, e.g. "export.serve.app"
    module: str  # the module imported, resolved to a file of ours where it is one
    names: tuple[str, ...]  # the names taken from it ("from module import a, b"); () for "import module"
    line: int


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def product_files() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))


MODULES = {module_name(p) for p in product_files()}


def _is_ours(name: str) -> bool:
    return name.split(".")[0] in OURS


def imports_of(path: Path) -> list[Import]:
    """Every import statement of the file, top level or inside a function."""
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found += [Import(me, a.name, (), node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package of this file
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            names = tuple(a.name for a in node.names)
            submodules = [n for n in names if f"{base}.{n}" in MODULES]
            for n in submodules:  # "from export import manifest": the module export.manifest
                found.append(Import(me, f"{base}.{n}", (), node.lineno))
            rest = tuple(n for n in names if n not in submodules)
            if rest:
                found.append(Import(me, base, rest, node.lineno))
    return found


ALL = [imp for p in product_files() for imp in imports_of(p)]


def _where(imp: Import) -> str:
    what = f"from {imp.module} import {', '.join(imp.names)}" if imp.names else f"import {imp.module}"
    return f"{imp.importer}:{imp.line}: {what}"


def _top(name: str) -> str:
    return name.split(".")[0]


def _within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def violations(rule) -> list[str]:
    return [f"{_where(i)}  ({why})" for i in ALL if (why := rule(i))]


def core_rule(i: Import) -> str | None:
    if _top(i.importer) != "core":
        return None
    if _is_ours(i.module) and _top(i.module) != "core":
        return "core imports nothing of ours above it"
    if _within(i.module, "torch.distributed") or _within(i.module, "nvidia.dali"):
        return "core imports neither torch.distributed nor nvidia.dali"
    return None


def export_distributed_rule(i: Import) -> str | None:
    pair = (_top(i.importer), _top(i.module))
    if pair in (("export", "distributed"), ("distributed", "export")):
        return "distributed and export never import each other"
    if pair[0] in ("export", "distributed") and pair[1] in ("bench", "tools"):
        return f"{pair[0]} imports nothing of the layers above it"
    return None


def serve_rule(i: Import) -> str | None:
    if not _within(i.importer, "export.serve") or _top(i.module) != "export" or _within(i.module, "export.serve"):
        return None
    if i.module == "export.runtime" and all(not n.startswith("_") for n in i.names):
        return None
    return "export.serve reaches the model only through export.runtime's public names"


def bench_rule(i: Import) -> str | None:
    if _top(i.importer) != "bench" or not _is_ours(i.module) or i.module == i.importer:
        return None
    private = [n for n in i.names if n.startswith("_")]
    if private:
        return f"bench imports only public names, not {', '.join(private)}"
    if _within(i.module, "export.runtime") and i.module not in ("export.runtime", "export.runtime.caption"):
        return "bench uses export.runtime's public API (the package, or the caption command), not its modules"
    return None


def ray_rule(i: Import) -> str | None:
    if _within(i.module, "ray") and _is_ours(i.importer) and not _within(i.importer, "export.runtime.batch"):
        return "only export.runtime.batch imports Ray (the optional [scale] extra)"
    return None


def no_tests_rule(i: Import) -> str | None:
    return "product code never imports tests/" if _top(i.module) == "tests" else None


@pytest.mark.parametrize("rule", [core_rule, export_distributed_rule, serve_rule, bench_rule, ray_rule, no_tests_rule])
def test_import_rule(rule):
    found = violations(rule)
    assert not found, "\n".join(found)


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, str] = {}

    def visit(mod: str, path: list[str]) -> list[str] | None:
        if state.get(mod) == "done":
            return None
        if state.get(mod) == "active":
            return path[path.index(mod):] + [mod]
        state[mod] = "active"
        for dep in sorted(graph.get(mod, ())):
            if cycle := visit(dep, path + [mod]):
                return cycle
        state[mod] = "done"
        return None

    for mod in sorted(graph):
        if cycle := visit(mod, []):
            return cycle
    return None


def test_no_import_cycle():
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for i in ALL:
        if i.module in MODULES and i.module != i.importer:
            graph[i.importer].add(i.module)
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_rules_catch_what_they_forbid():
    """Each rule flags a made-up violation (so a rule that matches nothing cannot pass silently)."""
    assert core_rule(Import("core.data", "distributed.env", ("DistEnv",), 1))
    assert core_rule(Import("core.data", "torch.distributed", (), 1))
    assert core_rule(Import("core.data", "nvidia.dali.fn", (), 1))
    assert export_distributed_rule(Import("export.to_onnx", "distributed.config", ("TrainConfig",), 1))
    assert export_distributed_rule(Import("distributed.train", "export.manifest", (), 1))
    assert serve_rule(Import("export.serve.app", "export.runtime.backends", ("Backend",), 1))
    assert serve_rule(Import("export.serve.app", "export.manifest", (), 1))
    assert not serve_rule(Import("export.serve.app", "export.runtime", ("Captioner",), 1))
    assert bench_rule(Import("bench.report", "bench.rows", ("_fmt_ms",), 1))
    assert bench_rule(Import("bench.suite", "export.runtime.load", ("load_backend",), 1))
    assert no_tests_rule(Import("bench.suite", "tests.support.server", (), 1))
    assert ray_rule(Import("export.runtime.captioner", "ray.data", (), 1))
    assert not ray_rule(Import("export.runtime.batch.worker", "ray", (), 1))
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_core_foundations_import_nothing_of_ours():
    """The image loader and the caption-file rules sit at the very bottom; the dataset check does not load data."""
    graph = {i.importer: set() for i in ALL}
    for i in ALL:
        if _is_ours(i.module):
            graph[i.importer].add(i.module)
    assert graph["core.images"] == set() and graph["core.captions"] == set()
    assert "core.data" not in graph["core.datacheck"]
