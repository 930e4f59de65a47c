"""The harness (tests/harness, imported as keruta_harness) stands apart from the project it tests: it imports
nothing of keruta_prefect nor of the test suite, so a bug in the project's own checks can show up against it.
Its own checks (image names, quantities) follow Kubernetes' rules, tested here on Kubernetes' examples."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import keruta_harness
import pytest
from keruta_harness.validate import image_problem, parse_quantity

HARNESS = Path(__file__).resolve().parent / "harness"
FORBIDDEN = ("keruta_prefect", "tests")


def _modules() -> list[Path]:
    return sorted(HARNESS.glob("*.py"))


def _is_forbidden(name: str) -> bool:
    return any(name == root or name.startswith(f"{root}.") for root in FORBIDDEN)


def _imports(path: Path) -> list[tuple[int, str]]:
    """Every module ``path`` imports or names for a dynamic import, with its line; relative imports that
    leave the package are given as ".."."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level > 1:
                found.append((node.lineno, ".." + (node.module or "")))
            elif node.level == 0 and node.module:
                found.append((node.lineno, node.module))
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
            if name in ("import_module", "__import__"):
                found.append((node.lineno, node.args[0].value))
    return found


def test_keruta_harness_is_this_directory() -> None:
    assert Path(keruta_harness.__file__).resolve().parent == HARNESS, (
        f"keruta_harness is imported from {keruta_harness.__file__}, not {HARNESS}: install it editable from "
        "this tree (`pip install -e tests/harness`, as `make install` does)")


def test_no_harness_module_imports_the_project_or_the_test_suite() -> None:
    modules = _modules()
    assert {p.name for p in modules} >= {"cluster.py", "apiserver.py", "kubelet.py", "validate.py"}
    offending = [f"{path.name}:{line}: {name}" for path in modules for line, name in _imports(path)
                 if _is_forbidden(name) or name.startswith("..")]
    assert offending == []


def test_the_check_sees_every_kind_of_import(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text("import keruta_prefect.validation\nfrom tests.k8s_validate import versions\n"
                      "from .. import conftest\nimport importlib\nimportlib.import_module('keruta_prefect')\n"
                      "def later():\n    from keruta_prefect import backends\n")
    names = [name for _line, name in _imports(sample)]
    assert [n for n in names if _is_forbidden(n) or n.startswith("..")] == [
        "keruta_prefect.validation", "tests.k8s_validate", "..", "keruta_prefect", "keruta_prefect"]


def test_importing_every_harness_module_loads_nothing_of_the_project() -> None:
    names = [f"keruta_harness.{p.stem}" for p in _modules() if p.stem not in ("__init__", "__main__")]
    code = ("import importlib, sys\n"
            f"for name in {names!r}:\n    importlib.import_module(name)\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('keruta_prefect', 'tests')))\n")
    done = subprocess.run([sys.executable, "-c", code], cwd="/", capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


# Kubernetes' resource.Quantity grammar (apimachinery quantity.go).
@pytest.mark.parametrize(("text", "value"), [
    ("0", 0), ("1", 1), ("100m", 0.1), ("1.5", 1.5), ("1.", 1), (".5", 0.5), ("+1", 1), ("-1", -1),
    ("1Ki", 1024), ("1.5Gi", 1.5 * 2**30), ("2e3", 2000), ("2E3", 2000), ("2e-3", 0.002), ("1E", 1e18),
    ("500u", 5e-4), ("10n", 1e-8), ("1k", 1000), ("1M", 1e6), (2, 2), (0.5, 0.5), (" 1 ", 1),
])
def test_quantities_kubernetes_accepts(text: str | float, value: float) -> None:
    assert parse_quantity(text) == pytest.approx(value)


@pytest.mark.parametrize("text", ["", "1K", "1ki", "1mi", "1e", "1.5.5", "abc", "12 parsecs", "1Gb", "--1",
                                  "1e3.5", ".", "+", "Ki", "1 Gi", True, None])
def test_quantities_kubernetes_refuses(text: object) -> None:
    with pytest.raises(ValueError, match="quantities must match"):
        parse_quantity(text)


# How the kubelet parses an image name (distribution/reference ParseNormalizedNamed, go-digest).
HEX64 = "0123456789abcdef" * 4


@pytest.mark.parametrize("image", [
    "busybox", "busybox:1.36", "library/busybox", "docker.io/library/busybox:latest",
    "registry.example.com/keruta-agent:1.0", "localhost/x", "localhost:5000/a/b:c", "[::1]:5000/x",
    "127.0.0.1:5000/x", "Registry.Example.com/x", "UPPER/repo", "a__b", "a---b", "a.b_c", "x:Tag_1.0-rc",
    f"x@sha256:{HEX64}", f"x:tag@sha256:{HEX64}", f"x@sha512:{HEX64 * 2}",
])
def test_image_names_the_kubelet_accepts(image: str) -> None:
    assert image_problem(image) is None


@pytest.mark.parametrize(("image", "problem"), [
    ("", "invalid reference format"),
    ("Busybox", "repository name (library/Busybox) must be lowercase"),
    ("x/Y", "repository name (x/Y) must be lowercase"),
    (HEX64, "cannot specify 64-byte hexadecimal strings"),
    ("x:", "invalid reference format"), ("-x", "invalid reference format"), ("x-", "invalid reference format"),
    ("x y", "invalid reference format"), ("x//y", "invalid reference format"), ("a___b", "invalid reference format"),
    ("-registry.com/x", "invalid reference format"), ("x:" + "t" * 129, "invalid reference format"),
    ("x@sha256:abc", "invalid reference format"), ("x:é", "invalid reference format"),
    (f"x@sha256:{HEX64[:32]}", "invalid checksum digest length"),
    (f"x@md5:{HEX64[:32]}", "unsupported digest algorithm"),
    (f"x@sha256:{HEX64.upper()}", "invalid checksum digest format"),
    ("host.com/" + "a" * 256, "repository name must not be more than 255 characters"),
])
def test_image_names_the_kubelet_refuses(image: str, problem: str) -> None:
    assert problem in (image_problem(image) or "")
