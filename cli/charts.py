"""The daily report's PNG charts (matplotlib, imported when a chart is drawn): the day's equity
curves with kill-switch events, and the PnL of each closed trade."""

from __future__ import annotations

from pathlib import Path

from cli.report_data import KILL_SWITCH_KINDS, DayData, strategy_key


def _figure(width: float = 9.0, height: float = 3.6):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig

def equity_chart(data: DayData, path: Path) -> None:
    """Every strategy's equity over the day, kill-switch trips and resets as vertical lines."""
    fig = _figure()
    ax = fig.add_subplot(1, 1, 1)
    curves: dict[str, tuple[list, list]] = {}
    for r in data.equity:
        xs, ys = curves.setdefault(strategy_key(r), ([], []))
        xs.append(r["ts"])
        ys.append(r["equity"])
    for name, (xs, ys) in curves.items():
        ax.plot(xs, ys, linewidth=1.2, label=name)
    for e in data.events:
        if e["kind"] in KILL_SWITCH_KINDS:
            ax.axvline(e["ts"], color="red" if e["kind"] == "kill_switch" else "green", linestyle="--",
                       linewidth=1, label=e["kind"])
    ax.set_title(f"Equity {data.day.isoformat()} (UTC)")
    ax.set_ylabel("equity")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    import matplotlib.dates as mdates

    ax.xaxis.set_major_formatter(mdates.DateFormatter("%H:%M"))
    fig.tight_layout()
    fig.savefig(path, format="png")


def pnl_chart(data: DayData, path: Path) -> None:
    """The PnL of each closed trade of the day, in exit order."""
    fig = _figure()
    ax = fig.add_subplot(1, 1, 1)
    pnl = [t["pnl"] for t in data.trades]
    ax.bar(range(1, len(pnl) + 1), pnl, color=["tab:green" if p > 0 else "tab:red" for p in pnl])
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_title(f"PnL per closed trade {data.day.isoformat()} (in exit order, net of fees)")
    ax.set_xlabel("trade")
    ax.set_ylabel("PnL")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, format="png")
