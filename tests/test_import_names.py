"""The checkout's `kernels/` directory must not shadow the Hugging Face `kernels` package, which transformers >= 5.25
imports at load time: with the repo root first on sys.path (`python -m pytest`, `python train.py`) an `import kernels`
has to reach the installed package, and this project's kernels stay importable as `cwic_kernels`."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PROBE = """
import sys
sys.path[:0] = [{root!r}, {other!r}]
import kernels, cwic_kernels
from kernels import CUDAProperties
print(kernels.__file__)
print(cwic_kernels.__name__)
"""


def test_import_kernels_reaches_the_installed_package(tmp_path):
    other = tmp_path / "site"
    (other / "kernels").mkdir(parents=True)
    (other / "kernels" / "__init__.py").write_text("CUDAProperties = object\n")
    r = subprocess.run([sys.executable, "-c", PROBE.format(root=str(ROOT), other=str(other))], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    file, name = r.stdout.split()
    assert Path(file).resolve() == (other / "kernels" / "__init__.py").resolve()
    assert name == "cwic_kernels"


def test_import_kernels_in_this_environment():
    """With the repo root first: `import kernels` is the installed Hugging Face package where this environment has one
    (transformers >= 5.25 depends on it), else this checkout's empty module; either way transformers' hub-kernel
    integration imports."""
    code = (f"import sys; sys.path.insert(0, {str(ROOT)!r})\n"
            "import importlib.metadata as md\n"
            "try:\n    md.distribution('kernels'); installed = True\n"
            "except md.PackageNotFoundError:\n    installed = False\n"
            "import kernels, transformers.integrations.hub_kernels\n"
            "print(installed, kernels.__file__)")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    installed, file = r.stdout.split()
    ours = Path(file).resolve() == (ROOT / "kernels" / "__init__.py").resolve()
    assert ours != (installed == "True"), r.stdout


def test_pyproject_lists_every_package_and_kernel_source():
    """A plain `pip install .` (not the Makefile's editable one) must carry every subpackage (cwic_exp.eval was
    missing), the evaluation's task files and every C++ source the CPU kernels compile (the .inc was missing). Every
    folder with Python files is a listed package: the task folder (its `utils.py`, no `__init__.py`) was not, and
    setuptools warned that it "would be ignored"."""
    import tomllib
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    cfg = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(cfg["packages"])
    for base, name in ((root / "src" / "cwic_exp", "cwic_exp"), (root / "kernels", "cwic_kernels")):
        for folder in {f.parent for f in base.rglob("*.py") if "__pycache__" not in f.parts}:
            assert ".".join((name, *folder.relative_to(base).parts)) in listed, folder
    data = cfg["package-data"]
    tasks = root / "src" / "cwic_exp" / "eval" / "tasks"
    for f in tasks.iterdir():
        if f.is_file() and f.suffix != ".py":
            assert any(f.relative_to(tasks).match(pat) for pat in data["cwic_exp.eval.tasks"]), f
    from cwic_kernels import cpu
    for f in cpu.SOURCES + cpu.DEPENDS:
        assert any(Path("cpu", f).match(pat) for pat in data["cwic_kernels"]), f


def test_every_package_the_code_imports_is_a_declared_dependency():
    """Each third-party package that src/, kernels/ or train.py imports is named in pyproject's dependencies. `rich`
    (chat's terminal view) was not, and came only through huggingface_hub >= 1.0: with transformers 4.56 (hub 0.36)
    chat failed to start."""
    import ast
    import re
    from importlib.metadata import packages_distributions
    tomllib = __import__("pytest").importorskip("tomllib")   # Python 3.11+
    norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()       # noqa: E731
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    declared = {norm(re.split(r"[<>=!~ ;\[]", d, maxsplit=1)[0]) for d in deps}
    dists = packages_distributions()
    files = [*(ROOT / "src").rglob("*.py"), *(ROOT / "kernels").rglob("*.py"), ROOT / "train.py"]
    missing = {}
    for f in files:
        for node in ast.walk(ast.parse(f.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else []
            for top in {n.split(".")[0] for n in names} - set(sys.stdlib_module_names) - {"cwic_exp", "cwic_kernels"}:
                if not {norm(d) for d in dists.get(top, [top])} & declared:
                    missing.setdefault(top, []).append(str(f.relative_to(ROOT)))
    assert not missing, missing
