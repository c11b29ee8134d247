"""This project's kernels, installed as `cwic_kernels` (pyproject.toml's package-dir); import them by that name.

Imported under the directory's own name, `kernels`, this file stands aside. That name belongs to the Hugging Face
`kernels` package, which transformers >= 5.25 depends on and imports at load time. A checkout whose root comes first
on sys.path (`python -m pytest`, `python train.py`) would otherwise shadow it, and every model load would fail with
"cannot import name 'CUDAProperties' from 'kernels'". So under that name this module loads the installed package
from the rest of sys.path in its own place (the import system returns what sys.modules holds). Where none is
installed it stays an empty module, as it always was.
"""
if __name__ == "kernels":
    import importlib.machinery as _machinery
    import importlib.util as _util
    import os as _os
    import sys as _sys

    _root = _os.path.realpath(_os.path.dirname(_os.path.dirname(_os.path.abspath(__file__))))
    _rest = [p for p in _sys.path if _os.path.realpath(p or _os.curdir) != _root]
    _spec = _machinery.PathFinder.find_spec("kernels", _rest)
    if _spec is not None and _spec.loader is not None and _spec.origin and \
            _os.path.realpath(_spec.origin) != _os.path.realpath(__file__):
        _real = _util.module_from_spec(_spec)
        _sys.modules["kernels"] = _real
        _spec.loader.exec_module(_real)
