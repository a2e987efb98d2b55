"""LightGBM, imported without scikit-learn and pandas.

At import, LightGBM's ``compat`` module tries scikit-learn and pandas, for its scikit-learn estimators
(``LGBMClassifier``, ...) and pandas inputs. Both are installed here (onnxmltools needs skl2onnx,
which needs scikit-learn; River needs pandas), so ``import lightgbm`` loaded them: ~100 MB more
resident in the process that trains (the main job trains between its two phases, beside the
embedded store). Training uses the core API only (``Dataset``, ``train``, ``Booster`` on numpy
arrays) and onnxmltools' LightGBM converter needs neither.

``import_lightgbm`` imports LightGBM with those two hidden from it: an import of ``sklearn`` or
``pandas`` that comes from LightGBM's own modules fails, as if they were not installed, and
LightGBM falls back as it does then (a package some other module already imported is not hidden:
it costs nothing more). Nothing else is touched: the finder is in place only while
LightGBM imports, and refuses only imports made from LightGBM's frames, so any other module (another
thread included) still imports them; a process that already imported LightGBM gets that module.
"""

from __future__ import annotations

import importlib.abc
import sys
import threading
from types import ModuleType

HIDDEN = ("sklearn", "pandas")

_lock = threading.Lock()


def _from_lightgbm() -> bool:
    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_globals.get("__name__", "").split(".")[0] == "lightgbm":
            return True
        frame = frame.f_back
    return False


class _HideFromLightGBM(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):  # noqa: ANN001 - the finder protocol
        top = name.split(".")[0]
        if top in HIDDEN and top not in sys.modules and _from_lightgbm():
            raise ModuleNotFoundError(f"No module named {name!r} (hidden from lightgbm by tapeflow)", name=name)
        return None


def import_lightgbm() -> ModuleType:
    """The ``lightgbm`` module, imported without scikit-learn and pandas (see the module docstring)."""
    with _lock:
        if "lightgbm" in sys.modules:
            return sys.modules["lightgbm"]
        finder = _HideFromLightGBM()
        sys.meta_path.insert(0, finder)
        try:
            import lightgbm
        finally:
            sys.meta_path.remove(finder)
        return lightgbm
