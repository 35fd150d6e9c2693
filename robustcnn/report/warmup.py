"""Load the report's plotting library while a sweep's jobs compute, not after them.

Why: the dashboard rebuilt at the end of a sweep spends ~1 s importing plotly and loading its
validators before it draws anything, and the user waits for it after the last job. A sweep's jobs
spend their time inside torch, which releases the GIL, so the same import on a background thread costs
nothing the user sees. The sweep starts it once a job has computed something (a sweep whose jobs were
all reused rebuilds no report, and must not pay for it); :func:`robustcnn.report.build_report` waits
for it to finish before it uses plotly, so the library is never used from two threads at once.
"""

from __future__ import annotations

from robustcnn.background import BackgroundLoad


def _load() -> None:
    try:
        import plotly.graph_objects as go
        from plotly.offline import get_plotlyjs

        # a first figure loads plotly's validators and the template the report uses
        go.Figure(data=[go.Scatter(x=[0.0], y=[1.0])], layout={"template": "plotly_white"}).to_json()
        get_plotlyjs()
    except Exception:  # noqa: BLE001 - a broken plotly is reported by the report itself, as one line
        return


_PLOTLY = BackgroundLoad("robustcnn-report-warmup", _load)
#: Begin loading plotly on a daemon thread (once per process; later calls do nothing).
start = _PLOTLY.start
#: Block until a started warm-up has finished (at once when none was started).
wait = _PLOTLY.wait
