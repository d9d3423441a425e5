"""The house rules of the code, checked from its source: the packages import each other one way
only (no cycles, function-level imports included), and a name of the data contract (a folder, a
column, a schema) is defined once, in ``vtplatform/schema.py``."""

from __future__ import annotations

import ast
import collections

from tests.conftest import ROOT

PACKAGE = ROOT / "vtplatform"

# The README's "Code layout" table, top to bottom: a module imports from its own row and those above.
LAYERS = [
    {"schema", "config", "storage", "labels"},
    {"models"},
    {"video"},
    {"manifest", "resources", "inference", "faults", "memory", "windows"},
    {"outputs"},
    {"pipeline"},
    {"lstm_data", "tsn_data", "frame_cache"},
    {"stages"},
    {"predict", "extract", "tag"},
    {"eval"},
    {"train"},
    {"export", "champions", "nightly", "report", "catalog", "cli"},
]


def _modules() -> dict[str, ast.Module]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        out[name] = ast.parse(path.read_text(encoding="utf-8"))
    return out


def _unit(module: str) -> str:
    """A subpackage (``vtplatform.train``) or a top-level module (``vtplatform.predict``)."""
    return ".".join(module.split(".")[:2])


def _imports(tree: ast.Module, modules: dict) -> set[str]:
    found = set()
    for node in ast.walk(tree):  # imports inside functions count: they hide cycles, not remove them
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("vtplatform"):
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in modules)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("vtplatform."))
    return {m for m in found if m in modules}


def test_packages_import_each_other_one_way_only():
    modules = _modules()
    edges = collections.defaultdict(set)
    for name, tree in modules.items():
        for target in _imports(tree, modules):
            if _unit(target) != _unit(name) and _unit(target) != "vtplatform":
                edges[_unit(name)].add(_unit(target))

    def reaches(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for nxt in edges[todo.pop()] - seen:
                seen.add(nxt)
                todo.append(nxt)
        return seen

    cycles = sorted(f"{a} -> {b}" for a in list(edges) for b in edges[a] if a in reaches(b))
    assert not cycles, f"import cycles between packages: {cycles}"
    # and the check itself sees imports, inside functions too
    assert "vtplatform.labels" in edges["vtplatform.train"] and "vtplatform.predict" in edges["vtplatform.eval"]


def test_modules_import_only_from_their_layer_and_those_above():
    modules = _modules()
    layer = {unit: i for i, units in enumerate(LAYERS) for unit in units}
    names = {_unit(m).removeprefix("vtplatform.") for m in modules} - {"vtplatform", "__init__"}
    assert names == set(layer), f"the layers and the package disagree: {names ^ set(layer)}"
    upward = []
    for name, tree in modules.items():
        here = _unit(name).removeprefix("vtplatform.")
        for target in _imports(tree, modules):
            there = _unit(target).removeprefix("vtplatform.")
            if here in layer and there in layer and layer[there] > layer[here]:
                upward.append(f"{name} imports {target}")
    assert not upward, upward


def test_contract_names_are_defined_once_in_schema():
    definitions = collections.defaultdict(list)
    for name, tree in _modules().items():
        for node in tree.body:
            if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
                const = node.targets[0].id
                if const.isupper() and const.endswith(("_SCHEMA", "_DIR")):
                    definitions[const].append(name)
                elif const.isupper() and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
                    definitions[f"{const}={node.value.value!r}"].append(name)
    twice = {k: v for k, v in definitions.items() if len(v) > 1}
    assert not twice, f"defined in more than one module: {twice}"
    outside = {k: v for k, v in definitions.items() if k.endswith("_SCHEMA") and v != ["vtplatform.schema"]}
    assert not outside, f"schemas belong in vtplatform/schema.py: {outside}"
    # The names of the folders and files of every layout (OUT, a run, a checkpoint, a registry) too.
    layout = {k: v for k, v in definitions.items() if k.split("=")[0].endswith(("_DIR", "_FILE"))}
    misplaced = {k: v for k, v in layout.items() if v != ["vtplatform.schema"] and not k.startswith("CURRENT_CLUSTER")}
    assert not misplaced, f"folder and file names belong in vtplatform/schema.py: {misplaced}"
    assert {"DEAD_LETTERS_DIR", "BEST_DIR", "TENSORBOARD_DIR", "EXPORT_TSN_DIR"} <= set(layout)


def test_every_model_the_config_accepts_has_its_jobs_in_the_catalog():
    """One registration: the names the config takes (schema.MODEL_NAMES) are the catalog's entries,
    and each entry gives every job its functions."""
    from vtplatform import catalog
    from vtplatform import schema as S

    assert set(catalog.MODELS) == set(S.MODEL_NAMES)
    for make in catalog.MODELS.values():
        jobs = make()
        assert all(callable(getattr(jobs, f)) for f in ("train", "evaluate", "format_report", "predict"))


def test_the_readme_layout_table_lists_the_layers_in_order():
    """The README's "Code layout" rows name the same units as ``LAYERS``, in the same order."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    table = text[text.index("## Code layout") :].split("\n## ", 1)[0]
    rows = [line for line in table.splitlines() if line.startswith("| `vtplatform/")]
    named = [
        {cell.strip("`").removeprefix("vtplatform/").strip("/").removesuffix(".py") for cell in _cells(row)}
        for row in rows
    ]
    assert named == LAYERS


def _cells(row: str) -> list[str]:
    first = row.split("|")[1]
    return [part.strip() for part in first.split(",")]
