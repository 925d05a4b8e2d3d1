"""The package's layout holds: no import cycle, the data package imports only the
config's and the architecture's facts, and nothing outside it decodes or resizes images."""

import ast
import pathlib

from conftest import REPO

PACKAGE = REPO / "src" / "vgg_jax"


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _import_graph() -> dict[str, set[str]]:
    """module -> the package's modules it imports, at the top or inside functions."""
    modules = {_module_name(path): path for path in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                for alias in node.names:
                    member = f"{node.module}.{alias.name}"
                    imported.add(member if member in modules else node.module)
        graph[name] = {m for m in imported if m in modules and m != name}
    return graph


def test_no_import_cycle():
    graph, state, cycles = _import_graph(), {}, []

    def visit(module, path):
        state[module] = "open"
        for other in sorted(graph[module]):
            if state.get(other) == "open":
                cycles.append(path[path.index(other) :] + [module, other])
            elif other not in state:
                visit(other, [*path, module])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [])
    assert cycles == []


def test_the_data_package_imports_only_configuration_and_spec():
    graph = _import_graph()
    outside = {
        f"{module} -> {other}"
        for module, imported in graph.items()
        if module.startswith("vgg_jax.data")
        for other in imported
        if not other.startswith("vgg_jax.data")
    }
    allowed = {"vgg_jax.configuration", "vgg_jax.spec"}
    assert {line for line in outside if line.split(" -> ")[1] not in allowed} == set()


def test_only_the_data_package_decodes_or_resizes_images():
    # OpenCV, and PIL's opening and resampling, are data/views.py's (the tf.data peer of
    # the input benchmark decodes in TensorFlow, as its comparison requires).
    signs = ("import cv2", "Image.open(", "Image.Resampling", ".imdecode(")
    found = [
        f"{path.relative_to(PACKAGE)}: {sign}"
        for path in PACKAGE.rglob("*.py")
        if "data" not in path.relative_to(PACKAGE).parts
        for sign in signs
        if sign in path.read_text()
    ]
    assert found == []


def test_the_cpu_speed_work_is_injected_at_one_place():
    # models.backend_tuning hands it to model building, training and the checkpoint
    # manager; the CLIs' process-level restart (cpu.host_memory) is the one other user.
    users = {
        module
        for module, imported in _import_graph().items()
        if not module.startswith("vgg_jax.cpu")
        for other in imported
        if other.startswith("vgg_jax.cpu") and other != "vgg_jax.cpu.host_memory"
    }
    assert users == {"vgg_jax.models"}
