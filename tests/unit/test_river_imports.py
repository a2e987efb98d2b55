"""River without the SciPy modules and example data sets the pipeline never calls
(models/river_imports.py), and the depth limit that bounds each instrument's forest
(models/online.py; issue 16: memory). The import tests run in a fresh interpreter, since this
one has imported River already."""
import subprocess
import sys

import pytest

from models.online import ARF, OnlineConfig, OnlineModels, build_models

HEAVY = ("sklearn", "pandas", "scipy.stats", "scipy.integrate", "scipy.ndimage", "scipy.optimize")


def _fresh(code: str) -> list[str]:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return out.stdout.split()


def test_the_online_models_load_none_of_the_heavy_modules_river_imports_but_never_calls():
    code = ("import sys, random, models.online as m\n"
            "o = m.OnlineModels(m.OnlineConfig(seed=1, warmup_labels=1, arf_models=2))\n"
            "models = m.build_models(('a', 'b'), m.OnlineConfig(seed=1, arf_models=2))\n"
            "r = random.Random(1)\n"
            "for i in range(300):\n"
            "    x = {'a': r.gauss(0, 1), 'b': r.gauss(0, 1)}\n"
            "    for p in models.values(): p.predict_proba_one(x); p.learn_one(x, int(x['a'] > 0))\n"
            f"print(sorted(k for k in {HEAVY!r} if k in sys.modules))\n"
            "print(type(sys.modules.get('scipy.stats')).__name__)\n")
    assert _fresh(code) == ["[]", "NoneType"]  # learned and predicted without them; no placeholder left behind


def test_river_code_that_uses_the_deferred_modules_still_gets_the_real_ones():
    code = ("import math, random, models.online\n"
            "from river import drift, metrics, proba, datasets\n"
            "import scipy.stats as st\n"
            "print(type(st).__name__, st.norm.cdf(0.0))\n"  # a later import is the real module
            "k, r = drift.KSWIN(seed=1, window_size=60, stat_size=20), random.Random(2)\n"
            "changed = False\n"
            "for i in range(600):\n"  # KSWIN calls scipy.stats.ks_2samp (imported as a placeholder)
            "    k.update(r.gauss(0, 1) + (8 if i > 300 else 0)); changed = changed or k.drift_detected\n"
            "print(changed)\n"
            "g = proba.MultivariateGaussian()\n"  # calls multivariate_normal (imported by name)
            "for x in ({'a': 1.0, 'b': 2.0}, {'a': 2.0, 'b': 1.0}, {'a': 0.5, 'b': 1.5}): g.update(x)\n"
            "print(round(g({'a': 1.0, 'b': 1.5}), 4))\n"
            "auc = metrics.ROCAUC()\n"  # scipy.integrate.trapezoid
            "for y, p in ((1, 0.9), (0, 0.2), (1, 0.7), (0, 0.4)): auc.update(y, p)\n"
            "print(auc.get())\n"
            "print(datasets.Phishing.__name__)\n")  # the example data sets: scikit-learn-free, still there
    out = _fresh(code)
    assert out[:3] == ["module", "0.5", "True"]
    assert 0 < float(out[3]) < 1 and float(out[4]) == 1.0 and out[5] == "Phishing"


def test_the_forest_s_trees_stay_within_the_depth_limit():
    names = tuple(f"f{i}" for i in range(6))
    cfg = OnlineConfig(seed=3, arf_models=3, arf_max_depth=2)
    arf = build_models(names, cfg)[ARF]
    import random
    r = random.Random(5)
    for _ in range(3000):
        x = {n: r.gauss(0, 1) for n in names}
        arf.learn_one(x, 0 if x["f0"] < -0.4 else 2 if x["f0"] > 0.4 else 1)
    forest = arf[-1]
    assert [m.max_depth for m in forest] == [2, 2, 2]
    # River's height counts levels (a lone root is 1): leaves at depth 2, the limit (the signal is
    # easy to split on), none past it
    assert max(m.height for m in forest) == 3
    assert OnlineConfig().arf_max_depth == 6  # the default


def test_the_depth_limit_is_validated():
    with pytest.raises(ValueError, match="arf_max_depth"):
        OnlineConfig(arf_max_depth=0)
    assert OnlineModels(OnlineConfig(arf_max_depth=1)) is not None
