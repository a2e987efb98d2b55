"""Incremental technical indicators, O(1) per bar in the length of the history (a few fixed-size
windows at most), with plain picklable state. Pure logic, no bytewax.

Why hand-written (measured, issue 13): FeatureStage lives in bytewax state, which is deep-copied
at every epoch close and pickled into recovery snapshots. TA-Lib's streaming handles
(``talib.stream``, O(1) and exact) cannot be pickled ("a stream handle points into the TA-Lib C
library"). talipp keeps every past input and output in lists (its pickle grows without bound:
0.1-1 MB per indicator after 3,000 bars), costs 2-20 us per update, and 5 of 13 indicators checked
differ from TA-Lib (ATR, ADX and SAR seeding by 1-3%, MACD's signal by up to 21%, TRIX by a factor
of 100). So each class here follows the TA-Lib C function of the same name, and
``tests/unit/test_indicators.py`` checks every one against TA-Lib on long random bar series:
<= 1e-9 relative, and the same warm-up (the first value at TA-Lib's lookback index).

Conventions: ``update(...)`` takes one closed bar's inputs and returns the value at that bar, or
None while warming up (never a made-up value). Where a window is degenerate (no range, no
movement, no volume) TA-Lib answers 0; the oscillators here answer their neutral value instead
(RSI, Stochastic, MFI 50; Vortex 1 and 1), as each docstring says. On any other data they agree.

The classes live in one module per family (``averages``, ``windows``, ``volatility``, ``trend``,
``oscillators``, ``volume``) and are imported from here: ``from operators.indicators import ATR``.
"""

from operators.indicators.averages import EMA, HMA, SMA, VWMA, WMA, Wilder
from operators.indicators.oscillators import CCI, MACD, RSI, TRIX, TSI, Stoch
from operators.indicators.trend import DMI, SAR, AroonOsc, Fractal, Supertrend, Vortex
from operators.indicators.volatility import ATR, CVI, KC, TrueRange
from operators.indicators.volume import ADOSC, CMF, MFI, TIE, money_flow_multiplier
from operators.indicators.windows import Correl, MaxMin, StdDev

__all__ = [
    "SMA", "EMA", "Wilder", "WMA", "HMA", "VWMA",
    "RSI", "MACD", "TRIX", "Stoch", "CCI", "TSI",
    "DMI", "SAR", "Supertrend", "Vortex", "AroonOsc", "Fractal",
    "TrueRange", "ATR", "KC", "CVI",
    "TIE", "MFI", "ADOSC", "money_flow_multiplier", "CMF",
    "StdDev", "MaxMin", "Correl",
]
