"""E2B's structured results from the kernel (issue 14): `e2b/chart` in a matplotlib figure's
bundle and `e2b/data` in a pandas DataFrame's, for execute requests whose metadata asks for them
(`sandgate_e2b`, as the gateway's E2B-compatible API sends), through jupyter_client.

Each chart is checked key by key against PyPI's e2b-charts 1.0.0 (the extractor E2B's own
sandbox runs) on the same figure made here, in this process, with the same matplotlib version
as the sandbox's; and read by the E2B SDK's own deserializer."""

import base64
import io
import json
import math
import numbers
import textwrap
import warnings

import matplotlib
import pytest

matplotlib.use("agg")

import matplotlib.pyplot as plt  # noqa: E402
import nbformat.v4  # noqa: E402
from e2b_charts import chart_figure_to_dict  # noqa: E402
from e2b_code_interpreter import charts as sdk_charts  # noqa: E402
from e2b_code_interpreter.models import Result  # noqa: E402

from conftest import of_type  # noqa: E402

E2B = {"sandgate_e2b": True}


def run(kernel, code, metadata=E2B, timeout=120):
    """Runs `code` as an execute_request with `metadata`; (reply, iopub outputs)."""
    content = {"code": code, "silent": False, "store_history": True, "user_expressions": {},
               "allow_stdin": False, "stop_on_error": True}
    msg = kernel.kc.session.msg("execute_request", content, metadata=dict(metadata))
    kernel.kc.shell_channel.send(msg)
    return kernel.collect(msg["header"]["msg_id"], timeout)


def bundles(outputs):
    """(data, metadata) of each display_data and execute_result, in order."""
    return [(m["content"]["data"], m["content"]["metadata"]) for m in outputs
            if m["msg_type"] in ("display_data", "execute_result")]


def _wire_default(value):
    # What jupyter_client's packer does with what a pydantic dump leaves (numpy scalars).
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    raise TypeError(repr(value))


def _nan_to_null(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _nan_to_null(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_nan_to_null(v) for v in value]
    return value


def reference(code):
    """e2b-charts 1.0.0's chart for the figure `code` makes, run here (after drawing it as the
    kernel does), as it reaches E2B's client: JSON, NaN as null."""
    namespace = {"plt": plt}
    plt.close("all")
    try:
        exec(code, namespace)
        fig = plt.gcf()
        fig.savefig(io.BytesIO(), format="png", bbox_inches="tight")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e2b-charts reads `axis.converter`, deprecated
            chart = chart_figure_to_dict(fig)
    finally:
        plt.close("all")
    return _nan_to_null(json.loads(json.dumps(chart, default=_wire_default)))


def figure_bundle(kernel, code):
    reply, outputs = run(kernel, "import matplotlib.pyplot as plt\n" + code)
    assert reply["status"] == "ok", reply
    shown = [b for b in bundles(outputs) if "image/png" in b[0]]
    assert len(shown) == 1, outputs
    return shown[0]


CHARTS = {
    "line": ("""
        fig, ax = plt.subplots()
        ax.plot([1, 2, 3, 4], [10, 12, 9, 15], label="sales")
        ax.plot([1, 2, 3, 4], [3, 4, 5, float("nan")])
        ax.set_title("Sales"); ax.set_xlabel("Month"); ax.set_ylabel("Revenue (USD)")
        ax.grid(True)
    """, "line", sdk_charts.LineChart),
    "scatter": ("""
        fig, ax = plt.subplots()
        ax.scatter([1, 2, 3, 5], [4.5, 1, 3, 2], label="points")
        ax.scatter([2.5], [2.5])
        ax.set_xlabel("Count [n]"); ax.axhline(2)
    """, "scatter", sdk_charts.ScatterChart),
    "bar": ("""
        fig, ax = plt.subplots()
        ax.bar(["A", "B", "C"], [3, 5, 2], label="grp")
        ax.set_ylabel("Count [n]")
    """, "bar", sdk_charts.BarChart),
    "horizontal bar": ("""
        fig, ax = plt.subplots()
        ax.barh(["north", "south", "east"], [3.5, 5, 2])
        ax.set_xlabel("Weight (kg)")
    """, "bar", sdk_charts.BarChart),
    "grouped bar": ("""
        import numpy as np
        fig, ax = plt.subplots()
        x = np.arange(3)
        ax.bar(x - 0.2, [1, 2, 3], 0.4, label="2024")
        ax.bar(x + 0.2, [3, 2, 4], 0.4, label="2025")
        ax.set_xticks(x, ["Q1", "Q2", "Q3"])
    """, "bar", sdk_charts.BarChart),
    "pie": ("""
        fig, ax = plt.subplots()
        ax.pie([30, 45, 25], labels=["x", "y", "z"], autopct="%1.0f%%")
        ax.set_title("Share")
    """, "pie", sdk_charts.PieChart),
    "box and whisker": ("""
        fig, ax = plt.subplots()
        ax.boxplot([[1, 2, 3, 4, 5, 20], [2, 3, 4, 5, 6, 7, 8], [0.5, 1, 1.5, 2, 2.5, 3]],
                   patch_artist=True, tick_labels=["a", "b", "c"])
        ax.set_title("Box"); ax.set_ylabel("Time (s)")
    """, "box_and_whisker", sdk_charts.BoxAndWhiskerChart),
    "superchart": ("""
        fig, (left, right) = plt.subplots(1, 2)
        left.plot([1, 2, 3], [3, 1, 2]); right.bar(["u", "v"], [1, 2])
        fig.suptitle("Two")
    """, "superchart", sdk_charts.SuperChart),
    "datetime axis": ("""
        import datetime
        fig, ax = plt.subplots()
        ax.plot([datetime.datetime(2024, 1, d) for d in (1, 8, 15, 22)], [1, 4, 2, 3])
    """, "line", sdk_charts.LineChart),
    "categorical axis": ("""
        fig, ax = plt.subplots()
        ax.plot(["mon", "tue", "wed"], [5, 7, 6], label="visits")
    """, "line", sdk_charts.LineChart),
    "log scale": ("""
        fig, ax = plt.subplots()
        ax.plot([1, 10, 100, 1000], [1, 2, 3, 4])
        ax.set_xscale("log")
    """, "line", sdk_charts.LineChart),
    "unknown": ("""
        fig, ax = plt.subplots()
        ax.fill_between([1, 2, 3], [1, 3, 2])
        ax.set_title("Area")
    """, "unknown", sdk_charts.Chart),
}


@pytest.mark.parametrize("name", list(CHARTS))
def test_a_figure_carries_the_chart_e2b_charts_makes_and_the_sdk_reads(kernel, name):
    code, kind, cls = CHARTS[name]
    code = textwrap.dedent(code)
    data, _ = figure_bundle(kernel, code)
    chart = data["e2b/chart"]
    expected = reference(code)
    assert chart["type"] == kind
    assert set(chart) == set(expected), (chart, expected)
    for key in expected:
        assert chart[key] == expected[key], (key, chart[key], expected[key])
    parsed = sdk_charts._deserialize_chart(chart)
    assert type(parsed) is cls
    assert type(Result(png=data["image/png"], chart=chart).chart) is cls
    if cls is sdk_charts.SuperChart:
        assert [type(c) for c in parsed.elements] == [sdk_charts.LineChart, sdk_charts.BarChart]


def test_the_charts_concrete_values(kernel):
    """The values themselves, for the keys E2B's clients read most."""
    line, _ = figure_bundle(kernel, textwrap.dedent(CHARTS["line"][0]))
    chart = line["e2b/chart"]
    assert (chart["title"], chart["x_label"], chart["y_label"]) == ("Sales", "Month", "Revenue (USD)")
    assert (chart["x_unit"], chart["y_unit"]) == (None, "USD")
    assert chart["elements"] == [
        {"label": "sales", "points": [[1.0, 10.0], [2.0, 12.0], [3.0, 9.0], [4.0, 15.0]]},
        {"label": "Line 1", "points": [[1.0, 3.0], [2.0, 4.0], [3.0, 5.0], [4.0, None]]},
    ]
    assert chart["x_scale"] == chart["y_scale"] == "linear"
    dates, _ = figure_bundle(kernel, textwrap.dedent(CHARTS["datetime axis"][0]))
    chart = dates["e2b/chart"]
    assert chart["x_scale"] == "datetime"
    assert chart["elements"][0]["points"][0] == ["2024-01-01T00:00:00", 1.0]
    assert all(t.endswith("+00:00") for t in chart["x_ticks"])
    cats, _ = figure_bundle(kernel, textwrap.dedent(CHARTS["categorical axis"][0]))
    assert cats["e2b/chart"]["x_scale"] == "categorical"
    assert cats["e2b/chart"]["x_tick_labels"] == ["mon", "tue", "wed"]
    assert cats["e2b/chart"]["elements"][0]["points"][0] == ["mon", 5.0]
    log, _ = figure_bundle(kernel, textwrap.dedent(CHARTS["log scale"][0]))
    assert log["e2b/chart"]["x_scale"] == "log"
    bars, _ = figure_bundle(kernel, textwrap.dedent(CHARTS["grouped bar"][0]))
    assert bars["e2b/chart"]["elements"] == [
        {"label": "Q1", "group": "2024", "value": 1.0}, {"label": "Q2", "group": "2024", "value": 2.0},
        {"label": "Q3", "group": "2024", "value": 3.0}, {"label": "Q1", "group": "2025", "value": 3.0},
        {"label": "Q2", "group": "2025", "value": 2.0}, {"label": "Q3", "group": "2025", "value": 4.0},
    ]
    barh, _ = figure_bundle(kernel, textwrap.dedent(CHARTS["horizontal bar"][0]))
    assert barh["e2b/chart"]["elements"][0] == {"label": "north", "group": "Group 0", "value": 3.5}
    # `barh`: the value axis is reported as y, as e2b-charts does.
    assert (barh["e2b/chart"]["y_label"], barh["e2b/chart"]["y_unit"]) == ("Weight (kg)", "kg")
    pie, _ = figure_bundle(kernel, textwrap.dedent(CHARTS["pie"][0]))
    assert pie["e2b/chart"]["elements"] == [
        {"label": "x", "angle": 108.0, "radius": 1.0}, {"label": "y", "angle": 162.0, "radius": 1.0},
        {"label": "z", "angle": 90.0, "radius": 1.0}]
    box, _ = figure_bundle(kernel, textwrap.dedent(CHARTS["box and whisker"][0]))
    assert box["e2b/chart"]["elements"][0] == BOX_A


BOX_A = {"label": "a", "min": 1.0, "first_quartile": 2.25, "median": 3.5, "third_quartile": 4.75,
         "max": 5.0, "outliers": [20.0]}


@pytest.mark.parametrize("code, expected", [
    # e2b-charts takes a lone box for a horizontal one and then finds no whiskers.
    ("ax.boxplot([[1, 2, 3, 4, 5, 20]], patch_artist=True, tick_labels=['a'])", [BOX_A]),
    # It takes a whisker of length 0 (no data between a quartile and the fence) for a median.
    ("ax.boxplot([[1, 2, 3, 4, 5, 20], [0.5, 1, 1.5, 2, 9]], patch_artist=True, tick_labels=['a', 'c'])",
     [BOX_A, {"label": "c", "min": 0.5, "first_quartile": 1.0, "median": 1.5, "third_quartile": 2.0,
              "max": 2.0, "outliers": [9.0]}]),
])
def test_boxes_e2b_charts_fails_on(kernel, code, expected):
    """Where e2b-charts raises (KeyError: no chart at all in E2B's sandbox), the kernel gives
    the boxes: the same reading, tried the other way round, a missing whisker at its quartile."""
    code = "fig, ax = plt.subplots()\n" + code + "\n"
    with pytest.raises(KeyError):
        reference(code)
    data, _ = figure_bundle(kernel, code)
    assert data["e2b/chart"]["elements"] == expected
    assert type(sdk_charts._deserialize_chart(data["e2b/chart"])) is sdk_charts.BoxAndWhiskerChart


def test_display_of_a_figure_and_a_figure_as_the_result_carry_the_chart(kernel):
    reply, outputs = run(kernel, textwrap.dedent("""
        import matplotlib.pyplot as plt
        from IPython.display import display
        f1, ax = plt.subplots(); ax.plot([1, 2], [3, 5])
        display(f1)
        f2, ax = plt.subplots(); ax.bar(["a", "b"], [1, 2])
        f2
    """))
    assert reply["status"] == "ok", reply
    shown = bundles(outputs)
    assert [b[0]["e2b/chart"]["type"] for b in shown] == ["line", "bar", "bar"]
    assert of_type(outputs, "execute_result")[0]["content"]["data"]["e2b/chart"]["type"] == "bar"


def test_a_figure_without_data_has_no_chart(kernel):
    reply, outputs = run(kernel, textwrap.dedent("""
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(); ax.set_title("empty")
        fig2 = plt.figure(); _ = fig2.text(0.5, 0.5, "just text")
    """))
    assert reply["status"] == "ok", reply
    shown = bundles(outputs)
    assert len(shown) == 2 and all("image/png" in d for d, _ in shown)
    assert not any("e2b/chart" in d or "e2b/chart" in md for d, md in shown)


def test_a_figure_whose_extraction_fails_still_shows_its_png(kernel):
    reply, outputs = run(kernel, textwrap.dedent("""
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(); _ = ax.plot([1, 2, 3], [1, 4, 9])
        def broken():
            raise RuntimeError("broken axes")
        ax.get_lines = broken
    """))
    assert reply["status"] == "ok", reply
    [(data, metadata)] = bundles(outputs)
    assert base64.b64decode(data["image/png"]).startswith(b"\x89PNG")
    assert data["text/plain"] == "<Figure size 640x480 with 1 Axes>"
    assert "e2b/chart" not in data
    assert "RuntimeError: broken axes" in metadata["e2b/chart"]["omitted"]
    assert not of_type(outputs, "error")
    assert "broken" not in "".join(m["content"].get("text", "") for m in of_type(outputs, "stream"))


def test_a_chart_too_large_for_the_output_budget_is_left_out(kernel):
    reply, outputs = run(kernel, textwrap.dedent("""
        import matplotlib.pyplot as plt, numpy as np
        fig, ax = plt.subplots(); _ = ax.plot(np.arange(400_000.0))
    """))
    assert reply["status"] == "ok", reply
    [(data, metadata)] = bundles(outputs)
    assert "image/png" in data and "e2b/chart" not in data
    assert "400000 points" in metadata["e2b/chart"]["omitted"]


DATAFRAME = textwrap.dedent("""
    import numpy as np, pandas as pd
    df = pd.DataFrame({
        "price": [1.5, np.nan, 3.25],
        "count": np.array([1, 2, 3], dtype=np.int64),
        "when": pd.to_datetime(["2024-01-01 00:00", "2024-01-02 12:30", None]),
        "name": ["a", None, "c"],
        "ok": [True, False, True],
        "maybe": pd.array([7, None, 9], dtype="Int64"),
        "utc": pd.to_datetime(["2024-03-01 08:00", None, "2024-03-02 09:15"]).tz_localize("UTC"),
        "wait": pd.to_timedelta(["1 day", "2 hours", None]),
    })
""")
DATAFRAME_DATA = {
    "price": [1.5, None, 3.25],
    "count": [1, 2, 3],
    "when": ["2024-01-01T00:00:00", "2024-01-02T12:30:00", None],
    "name": ["a", None, "c"],
    "ok": [True, False, True],
    "maybe": [7, None, 9],
    "utc": ["2024-03-01T08:00:00+00:00", None, "2024-03-02T09:15:00+00:00"],
    # jupyter_client's packer refuses a timedelta (ValueError: upstream's bundle is not sent).
    "wait": ["1 days 00:00:00", "0 days 02:00:00", None],
}


def test_a_dataframe_result_and_display_carry_its_columns(kernel):
    reply, outputs = run(kernel, DATAFRAME + "display(df)\ndf\n")
    assert reply["status"] == "ok", reply
    shown = bundles(outputs)
    assert [m["msg_type"] for m in outputs if m["msg_type"] in ("display_data", "execute_result")] \
        == ["display_data", "execute_result"]
    for data, _ in shown:
        assert data["e2b/data"] == DATAFRAME_DATA
        assert "<table" in data["text/html"]
        result = Result(text=data["text/plain"], html=data["text/html"], data=data["e2b/data"])
        assert result.data == DATAFRAME_DATA and "data" in result.formats()
    # A Series is not a DataFrame (e2b/data is a DataFrame's only, as upstream).
    reply, outputs = run(kernel, "df['price']")
    assert "e2b/data" not in bundles(outputs)[0][0]


def test_a_dataframe_too_large_for_the_output_budget_is_left_out(kernel):
    reply, outputs = run(kernel, "import numpy as np, pandas as pd\npd.DataFrame(np.zeros((1_100_000, 1)))")
    assert reply["status"] == "ok", reply
    [(data, metadata)] = bundles(outputs)
    assert "text/html" in data and "e2b/data" not in data
    assert "1100000 cells" in metadata["e2b/data"]["omitted"]


def test_jupyter_clients_get_the_chart_as_a_json_mime_type_nbformat_accepts(kernel):
    """Jupyter's clients never ask for E2B's keys: a figure's chart comes to them as
    `application/vnd.e2b.chart+json` (a JSON MIME type, which nbformat takes as a dict; it
    refuses the dict `e2b/chart` holds, which would fail nbclient and papermill), and a
    DataFrame has no `e2b/data`. Everything else is byte for byte what the E2B request gets."""
    code = DATAFRAME + "import matplotlib.pyplot as plt\nfig, ax = plt.subplots(); _ = ax.plot([1, 2], [3, 4])\ndisplay(fig)\ndf\n"
    _, without = run(kernel, code, metadata={})
    _, with_e2b = run(kernel, code)
    b_without, b_with = bundles(without), bundles(with_e2b)
    assert len(b_without) == len(b_with) == 2
    (fig0, figm0), (df0, dfm0) = b_without
    (fig1, _), (df1, dfm1) = b_with
    assert not any(k.startswith("e2b/") for k in list(fig0) + list(figm0) + list(df0) + list(dfm0))
    assert fig0["application/vnd.e2b.chart+json"] == fig1["e2b/chart"]
    assert fig0["application/vnd.e2b.chart+json"]["type"] == "line"
    assert "application/vnd.e2b.chart+json" not in fig1 and "e2b/data" in df1
    # text/plain, image/png and text/html byte for byte as for the E2B request.
    assert {k: v for k, v in fig1.items() if not k.startswith("e2b/")} == \
        {k: v for k, v in fig0.items() if not k.startswith("application/vnd.e2b")}
    assert {k: v for k, v in df1.items() if not k.startswith("e2b/")} == df0
    assert dfm1 == dfm0
    for m in without:
        if m["msg_type"] in ("display_data", "execute_result"):
            nbformat.validate(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(
                outputs=[nbformat.v4.output_from_msg(m)])]))
    with pytest.raises(Exception, match="e2b/chart"):
        nbformat.v4.output_from_msg(next(m for m in with_e2b if m["msg_type"] == "display_data"))


def test_own_e2b_reprs_are_used_as_upstream(kernel):
    """Objects with `_repr_e2b_data_` / `_repr_e2b_chart_` give those (IPython's formatters call
    them in E2B's sandbox)."""
    reply, outputs = run(kernel, textwrap.dedent("""
        class Thing:
            def _repr_e2b_data_(self):
                return {"x": [1, float("nan")]}
            def _repr_e2b_chart_(self):
                return {"type": "pie", "title": None, "elements": []}
            def __repr__(self):
                return "Thing()"
        Thing()
    """))
    assert reply["status"] == "ok", reply
    [(data, _)] = bundles(outputs)
    assert data["e2b/data"] == {"x": [1, None]}
    assert data["e2b/chart"] == {"type": "pie", "title": None, "elements": []}
    assert data["text/plain"] == "Thing()"
