"""Heavy packages imported without the optional packages they would pull in for nothing.

- **LightGBM without scikit-learn and pandas** (``import_lightgbm``). At import, LightGBM's
  ``compat`` module tries both, for its scikit-learn estimators (``LGBMClassifier``, ...) and pandas
  inputs. Both are installed here (onnxmltools needs skl2onnx, which needs scikit-learn; River needs
  pandas), so ``import lightgbm`` loaded them: ~100 MB more resident in the process that trains (the
  main job trains between its two phases, beside the embedded store). Training uses the core API
  only (``Dataset``, ``train``, ``Booster`` on numpy arrays) and onnxmltools' LightGBM converter
  needs neither.
- **chdb without pyarrow** (``import_chdb``). chdb imports pyarrow when it is installed (polars'
  and River's dependencies bring it) for its Arrow result formats: ~37 MB more resident in every
  process that opens the embedded store. The store reads rows as tuples through
  clickhouse-connect and never asks for Arrow; chdb treats pyarrow as optional.

``import_without`` imports a package with some others hidden from it: an import of a hidden
package that comes from the package's own modules fails, as if it were not installed, and the
package falls back as it does then (a hidden package some other module already imported is not
hidden: it costs nothing more). Nothing else is touched: the finder is in place only while the
package imports, and refuses only imports made from the package's frames, so any other module
(another thread included) still imports them, then or later; a process that already imported the
package gets that module.
"""

from __future__ import annotations

import importlib
import importlib.abc
import sys
import threading
from types import ModuleType

LIGHTGBM_HIDDEN = ("sklearn", "pandas")
CHDB_HIDDEN = ("pyarrow",)

_lock = threading.Lock()


def _from_package(package: str) -> bool:
    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_globals.get("__name__", "").split(".")[0] == package:
            return True
        frame = frame.f_back
    return False


class HideFrom(importlib.abc.MetaPathFinder):
    """Refuses ``hidden`` packages (not yet imported) to imports made from ``package``'s frames."""

    def __init__(self, package: str, hidden: tuple[str, ...]):
        self.package, self.hidden = package, hidden

    def find_spec(self, name, path=None, target=None):  # noqa: ANN001 - the finder protocol
        top = name.split(".")[0]
        if top in self.hidden and top not in sys.modules and _from_package(self.package):
            raise ModuleNotFoundError(f"No module named {name!r} (hidden from {self.package} by tapeflow)",
                                      name=name)
        return None


def import_without(package: str, hidden: tuple[str, ...], submodules: tuple[str, ...] = ()) -> ModuleType:
    """``package``, imported with ``hidden`` hidden from it (see the module docstring), and its
    ``submodules`` that it imports lazily, on first use, which would otherwise import the hidden ones."""
    with _lock:
        if package in sys.modules:
            return sys.modules[package]
        finder = HideFrom(package, hidden)
        sys.meta_path.insert(0, finder)
        try:
            module = importlib.import_module(package)
            for sub in submodules:
                importlib.import_module(f"{package}.{sub}")
            return module
        finally:
            sys.meta_path.remove(finder)


def import_lightgbm() -> ModuleType:
    """The ``lightgbm`` module, imported without scikit-learn and pandas."""
    return import_without("lightgbm", LIGHTGBM_HIDDEN)


def import_chdb() -> ModuleType:
    """The ``chdb`` module, imported without pyarrow (with ``chdb.state``, which chdb imports on first
    use and which imports pyarrow)."""
    return import_without("chdb", CHDB_HIDDEN, ("state",))
