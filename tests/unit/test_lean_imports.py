"""LightGBM imported without scikit-learn and pandas, chdb without pyarrow (models/lean_imports.py;
issue 16: memory). The import tests run in fresh interpreters: this one may have imported them all."""
import subprocess
import sys

from models.lean_imports import LIGHTGBM_HIDDEN as HIDDEN, HideFrom

TRAIN = ("import numpy as np\n"
         "rng = np.random.default_rng(7)\n"
         "x = rng.normal(size=(3000, 12)).astype(np.float32)\n"
         "x[rng.random(x.shape) < 0.05] = np.nan\n"
         "y = (x[:, 0] > 0).astype(int) + (x[:, 1] > 0.5).astype(int)\n"
         "b = lgb.train({'objective': 'multiclass', 'num_class': 3, 'verbosity': -1, 'num_threads': 1,\n"
         "               'deterministic': True}, lgb.Dataset(x, label=y), num_boost_round=25)\n")


def _fresh(code: str) -> list[str]:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return out.stdout.split("\n")


def test_training_and_onnx_export_load_neither_scikit_learn_nor_pandas():
    code = ("import sys\n"
            "from models.lean_imports import import_lightgbm\n"
            "lgb = import_lightgbm()\n" + TRAIN +
            "from models.onnx_export import booster_to_onnx, onnx_probabilities\n"
            "onx = booster_to_onnx(b, 12, check=x[:500])\n"
            "p = onnx_probabilities(onx.SerializeToString(), x[:500])\n"
            "print(float(np.abs(p - b.predict(x[:500])).max()))\n"
            "print(sorted(k for k in ('sklearn', 'pandas', 'skl2onnx') if k in sys.modules))\n"
            "print(any(type(f).__name__ == 'HideFrom' for f in sys.meta_path))\n"
            "import pandas\n"  # whoever imports them later gets them
            "print(hasattr(pandas, 'DataFrame'), import_lightgbm() is lgb)\n")
    diff, loaded, finder_left, later = _fresh(code)[:4]
    assert float(diff) < 1e-5  # the ONNX graph agrees with the booster
    assert loaded == "[]"
    assert finder_left == "False"
    assert later == "True True"


def test_the_booster_is_the_same_as_with_scikit_learn_and_pandas_loaded():
    lean = _fresh("from models.lean_imports import import_lightgbm\nlgb = import_lightgbm()\n" + TRAIN +
                  "import sys\nprint('sklearn' in sys.modules)\nprint(b.model_to_string())\n")
    full = _fresh("import lightgbm as lgb\n" + TRAIN +
                  "import sys\nprint('sklearn' in sys.modules)\nprint(b.model_to_string())\n")
    assert (lean[0], full[0]) == ("False", "True")
    assert lean[1:] == full[1:]
    assert len(lean) > 100  # a whole model, not an empty print


def test_only_imports_made_by_lightgbm_are_refused(monkeypatch):
    for name in HIDDEN:  # as in a process that has not imported them (this one may have)
        monkeypatch.delitem(sys.modules, name, raising=False)
    finder = HideFrom("lightgbm", HIDDEN)
    for name in HIDDEN:  # from here (not a lightgbm frame): left to the other finders
        assert finder.find_spec(name) is None
    lightgbm_like = {"__name__": "lightgbm.compat", "finder": finder}
    code = compile("try:\n    finder.find_spec('sklearn.base')\nexcept ModuleNotFoundError as e:\n    refused = e.name\n",
                   "compat.py", "exec")
    exec(code, lightgbm_like)  # noqa: S102 - a frame whose module is lightgbm's
    assert lightgbm_like["refused"] == "sklearn.base"
    assert finder.find_spec("numpy") is None
    monkeypatch.setitem(sys.modules, "sklearn", sys)  # imported already: costs nothing more, not hidden
    del lightgbm_like["refused"]
    exec(code, lightgbm_like)  # noqa: S102
    assert "refused" not in lightgbm_like


STORE = ("import sys, tempfile\n"
         "from sinks.store import Store\n"
         "st = Store('chdb://' + tempfile.mkdtemp(), 'lean')\n"
         "st.client.command('CREATE TABLE t (a Int64, s String, x Float64) ENGINE = MergeTree ORDER BY a')\n"
         "st.client.insert('t', [[i, str(i), i / 7] for i in range(5000)], column_names=['a', 's', 'x'])\n"
         "print(st.query('SELECT count(), sum(a), max(s), round(sum(x), 6) FROM t')[1])\n"
         "print('pyarrow' in sys.modules)\n")


def test_the_embedded_store_works_without_pyarrow_and_pyarrow_still_imports_later():
    lean = _fresh(STORE + "import pyarrow\nprint(pyarrow.array([1, 2]).sum().as_py())\n"
                  "print(any(type(f).__name__ == 'HideFrom' for f in sys.meta_path))\n")
    # the same store code with pyarrow imported first: chdb then uses it (nothing is hidden)
    full = _fresh("import pyarrow\n" + STORE)
    assert lean[0] == full[0]
    (count, total, top, xs), = eval(lean[0])  # noqa: S307 - our own print of a list of tuples
    assert (count, total, top) == (5000, sum(range(5000)), "999") and abs(xs - sum(range(5000)) / 7) < 1e-3
    assert (lean[1], full[1]) == ("False", "True")
    assert lean[2:4] == ["3", "False"]
