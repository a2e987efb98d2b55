"""River, imported without the parts of SciPy that the pipeline never calls.

River's package ``__init__`` files import every model, and with them ``scipy.stats``
(``river.proba``, ``river.drift``), ``scipy.integrate`` (``river.metrics.roc_auc``) and
``scipy.ndimage`` (``river.preprocessing.lda``) at import time, though only a few models use them,
and never ours. ``import_river`` imports River's modules with those SciPy modules stood in for by
placeholders that import the real module on first use (any attribute, or a call of one of the
names River imports from them by name), and takes the placeholders out of ``sys.modules``
afterwards: whoever imports SciPy later gets the real modules, and River's code that does use
them (``KSWIN``, ``MultivariateGaussian``, ``ROCAUC``, ...) still works, loading them then.
River's example data sets (``river.drift.datasets``, which import scikit-learn and pandas) are
deferred the same way.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import types
from contextlib import contextmanager
from typing import Iterator

# module -> the names River's modules take from it with ``from module import name`` (river 0.26)
SCIPY_DEFERRED: dict[str, tuple[str, ...]] = {
    "scipy.stats": ("multivariate_normal", "f"),  # river.proba.gaussian, river.tree.stochastic_gradient_tree
    "scipy.integrate": (),  # river.metrics.roc_auc
    "scipy.ndimage": (),  # river.preprocessing.lda
}


class _Deferred(types.ModuleType):
    """Stands in for module ``name`` until one of its attributes is used, then becomes it."""

    def __init__(self, name: str, names: tuple[str, ...]):
        super().__init__(name)
        for attr in names:
            setattr(self, attr, _DeferredName(self, attr))

    def _real(self) -> types.ModuleType:
        real = self.__dict__.get("_loaded")
        if real is None:
            _withdraw()  # the real module may import another deferred one: no placeholder must answer
            real = importlib.import_module(self.__name__)
            self.__dict__.update({k: v for k, v in real.__dict__.items() if not k.startswith("__")})
            self.__dict__["_loaded"] = real
        return real

    def __getattr__(self, attr: str):
        if attr.startswith("__"):  # the import system probes __path__, __spec__, ...: not a use
            raise AttributeError(attr)
        return getattr(self._real(), attr)


class _DeferredName:
    """``name`` of a deferred module, imported by name; calls and attributes go to the real one."""

    def __init__(self, module: _Deferred, name: str):
        self._module, self._name = module, name

    def _target(self):
        return getattr(self._module._real(), self._name)

    def __call__(self, *args, **kwargs):
        return self._target()(*args, **kwargs)

    def __getattr__(self, attr: str):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return getattr(self._target(), attr)


def _withdraw() -> None:
    """Take every placeholder out of ``sys.modules`` and off its parent package."""
    for name, module in list(sys.modules.items()):
        if isinstance(module, _Deferred):
            del sys.modules[name]
            parent, _, child = name.rpartition(".")
            owner = sys.modules.get(parent)
            if owner is not None and vars(owner).get(child) is module:
                delattr(owner, child)


@contextmanager
def _deferred(modules: dict[str, tuple[str, ...]]) -> Iterator[None]:
    for name, names in modules.items():
        if name not in sys.modules:
            sys.modules[name] = _Deferred(name, names)
    try:
        yield
    finally:
        _withdraw()


def _defer_river_datasets() -> None:
    """Put a stand-in for ``river.drift.datasets`` in ``sys.modules`` that imports the real module
    on first attribute access (PEP 562 ``__getattr__``). River's drift detectors (which ARF uses)
    import it for their example data sets, and through it ``river.datasets`` and ``river.stream``,
    which import scikit-learn and pandas: ~110 MB resident that the pipeline never calls. Code
    that uses those data sets still gets them, on first use. (``importlib.util.LazyLoader`` does
    not help here: the import system reads ``__spec__``, which would load the module at once.)"""
    name = "river.drift.datasets"
    root = importlib.util.find_spec("river")
    if name in sys.modules or root is None or not root.submodule_search_locations:
        return
    init = os.path.join(list(root.submodule_search_locations)[0], "drift", "datasets", "__init__.py")
    spec = importlib.util.spec_from_file_location(name, init, submodule_search_locations=[os.path.dirname(init)])
    if spec is None or spec.loader is None:
        return

    def load(attr: str):
        real = importlib.util.module_from_spec(spec)
        sys.modules[name] = real
        spec.loader.exec_module(real)
        parent = sys.modules.get("river.drift")
        if parent is not None:
            parent.datasets = real
        return getattr(real, attr)

    stub = types.ModuleType(name)
    stub.__spec__, stub.__path__, stub.__file__ = spec, spec.submodule_search_locations, init
    stub.__getattr__ = load
    sys.modules[name] = stub


def import_river(*names: str) -> list[types.ModuleType]:
    """``river.<name>`` for each name, imported as the module docstring says."""
    _defer_river_datasets()
    with _deferred(SCIPY_DEFERRED):
        return [importlib.import_module(f"river.{n}") for n in names]
