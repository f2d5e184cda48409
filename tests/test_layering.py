"""The package reads one way: every module imports only modules of its own layer or below.

Layers, lowest first (docs/design.md, "Layering"): the pattern a module matches gives
its layer (the longest, when several match); a pattern ending in "." matches a package and
everything in it. Imports inside
functions count as much as those at the top of a file.
"""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "beta_clip_jax"

LAYERS = [
    ("foundation", ["distributed", "sharding", "tokenizer", "profiling", "mathutil", "cli"]),
    ("data", ["data."]),
    ("model", ["models."]),
    ("loss", ["losses."]),
    ("method", ["methods."]),
    ("objective and optimiser", ["objective", "optim"]),
    ("storage", ["checkpoint"]),
    ("step", ["step"]),
    ("weights and evaluation", ["convert.", "evals."]),
    ("inference API", ["api"]),
    # A config's defaults and checks are assembled from every part they configure.
    ("config", ["config_defaults", "config_presets", "config_check", "config_drift"]),
    ("train setup", ["train_setup"]),
    ("reporting", ["reporting."]),
    # Writing an export reads the run's metrics for its model card.
    ("export", ["convert.export", "convert.export_formats", "convert.model_card"]),
    ("interfaces", ["perf", "bench.", "torch_pooler"]),
    ("trainer", ["train"]),
    ("commands", ["main", "evaluate"]),
]
# Commands that live beside the code they serve, inside a lower package: they sit on top.
COMMANDS = {
    "data.prepare",
    "data.startup_bench",
    "data.throughput",
    "methods.isoclip_apply",
    "export",
}


def rank(module: str) -> int:
    """The layer of the longest pattern `module` matches."""
    if module in COMMANDS:
        return len(LAYERS) - 1
    matches = [
        (len(pattern), index)
        for index, (_, patterns) in enumerate(LAYERS)
        for pattern in patterns
        if module == pattern.rstrip(".") or (pattern.endswith(".") and module.startswith(pattern))
    ]
    if not matches:
        raise AssertionError(f"beta_clip_jax.{module} is in no layer: add it to LAYERS")
    return max(matches)[1]


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if parts:
            yield ".".join(parts), path


def _imports(path: pathlib.Path, module: str):
    """(imported module relative to the package, line) for every beta_clip_jax import."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # "from beta_clip_jax import x" imports the module beta_clip_jax.x.
            if node.module == "beta_clip_jax":
                names = [f"beta_clip_jax.{a.name}" for a in node.names]
            else:
                names = [node.module]
        else:
            continue
        for name in names:
            if name.startswith("beta_clip_jax."):
                yield name[len("beta_clip_jax.") :], node.lineno


def _target(name: str) -> str:
    """The module an import names (a name imported from a package may be one of its modules)."""
    path = PACKAGE.joinpath(*name.split("."))
    if path.with_suffix(".py").exists() or (path / "__init__.py").exists():
        return name
    return name.rsplit(".", 1)[0]


def test_every_module_imports_only_downward():
    upward = []
    for module, path in _modules():
        own = rank(module)
        for name, line in _imports(path, module):
            target = _target(name)
            if target != module and rank(target) > own:
                upward.append(
                    f"{module} ({LAYERS[own][0]}) imports {target} "
                    f"({LAYERS[rank(target)][0]}) at line {line}"
                )
    assert not upward, "imports that point back up:\n" + "\n".join(upward)


@pytest.mark.parametrize("module", ["train", "methods.holistic", "evals.intramodal"])
def test_the_check_sees_imports(module):
    """The checker finds this repo's imports at all (a broken walk would find nothing)."""
    path = PACKAGE.joinpath(*module.split(".")).with_suffix(".py")
    assert list(_imports(path, module))


def test_an_upward_import_is_caught():
    assert rank("evals.retrieval") > rank("models.clip")
    assert rank("methods.isoclip_apply") == rank("export") > rank("convert.export")
    with pytest.raises(AssertionError, match="no layer"):
        rank("somewhere_new")
