"""E2B's structured results: `e2b/chart`, the data of a matplotlib figure, and `e2b/data`, the
columns of a pandas DataFrame, added to a display's MIME bundle when its request asks for them
(the gateway's E2B-compatible `/execute` does; see `_e2b_add`).

The chart format is the one PyPI's `e2b-charts` 1.0.0 (MIT, e2b-dev/code-interpreter) makes and
`e2b_code_interpreter.charts` reads: a dict per axes, classified by the artists on it (line,
scatter, bar, pie, box_and_whisker; `superchart` for a figure of several axes; `unknown` for
anything else), with the keys each class needs. Written here in plain Python (the image has no
pydantic); its quirks are kept where a client could see them (bar and box orientation, tick
and unit parsing, "Line N" and "Group N" names, rounding of box and pie values).

Loaded into the driver's namespace (it runs with the driver's globals) the first time a request
that asks for these shows a figure or a DataFrame.
"""

import decimal as _e2b_decimal
import math as _e2b_math
import numbers as _e2b_numbers
import datetime as _e2b_datetime

# The most JSON text one entry may take; a bigger one is left out of the bundle (with a note in
# its metadata), so it cannot spend the cell's output budget and lose the display itself.
_E2B_MAX_BYTES = 2 << 20
# The least JSON text one point of a chart and one cell of a DataFrame take (`[0,0],`, `0,`):
# anything with more of them than fit in the budget is left out before it is built.
_E2B_POINT_BYTES, _E2B_CELL_BYTES = 6, 2
_E2B_UNIT = re.compile(r"\s\((.*?)\)|\[(.*?)\]")


# The chart offered to Jupyter's clients: a JSON MIME type, which nbformat accepts as a dict.
JUPYTER_CHART_MIME = "application/vnd.e2b.chart+json"


def _e2b_add(obj, data, metadata, include=None, exclude=None, jupyter=False):
    """Adds `e2b/chart` (a figure with data) or `e2b/data` (a DataFrame) to `data`; for
    Jupyter's clients (`jupyter`), only the chart, as JUPYTER_CHART_MIME. Never raises an
    Exception: an extraction that fails or is too large leaves the key out and says why in
    `metadata[mime]`."""
    kinds = ((JUPYTER_CHART_MIME, _e2b_chart_entry),) if jupyter else (
        ("e2b/chart", _e2b_chart_entry), ("e2b/data", _e2b_data_entry))
    for mime, make in kinds:
        if include and mime not in include or exclude and mime in exclude:
            continue
        try:
            value = make(obj)
            if value is None:
                continue
            value = _e2b_json(value)
            size = len(_encode_json(value).encode())
            if size > _E2B_MAX_BYTES:
                raise _E2bTooLarge(f"{size} bytes of JSON")
        except _E2bTooLarge as e:
            metadata[mime] = {"omitted": f"over the {_E2B_MAX_BYTES}-byte cap: {e}"}
            continue
        except Exception as e:
            metadata[mime] = {"omitted": f"extraction failed: {type(e).__name__}: {e}"}
            continue
        data[mime] = value


class _E2bTooLarge(Exception):
    """An entry bigger than `_E2B_MAX_BYTES`."""


def _e2b_own(obj, name):
    """What `obj._repr_e2b_chart_()` / `_repr_e2b_data_()` returns, when it has one and it is a
    dict or a str (as IPython's formatters accept); else None."""
    method = _method(obj, name)
    if method is None:
        return None
    value = method()
    return value if isinstance(value, (dict, str)) else None


def _e2b_chart_entry(obj):
    if _is_figure(obj):
        return _e2b_chart(obj)
    return _e2b_own(obj, "_repr_e2b_chart_")


def _e2b_data_entry(obj):
    pandas = sys.modules.get("pandas")
    if pandas is None or not isinstance(obj, pandas.DataFrame):
        return _e2b_own(obj, "_repr_e2b_data_")
    if obj.size * _E2B_CELL_BYTES > _E2B_MAX_BYTES:
        raise _E2bTooLarge(f"{obj.size} cells")
    import warnings
    with warnings.catch_warnings():
        # "DataFrame columns are not unique, some columns will be omitted": as upstream, the
        # last of a name is kept; the warning would land in the user's stderr.
        warnings.simplefilter("ignore")
        columns = obj.to_dict(orient="list")
    return {(k if isinstance(k, str) else str(k)): v for k, v in columns.items()}


def _e2b_json(value):
    """`value` as JSON can carry it: NaN, infinities, NaT and NA as null, timestamps, dates and
    times as ISO strings, numpy scalars and arrays as Python numbers and lists, dict keys as
    strings, bytes as base64 (as jupyter_client's packer), anything else as its `str`."""
    kind = type(value)
    if kind is list or kind is tuple:
        # The bulk of a DataFrame's columns or a chart's points: plain values kept without a
        # call each (a finite float is one whose difference with itself is 0).
        return [v if (t := type(v)) is str or t is int or t is bool or v is None
                or t is float and v - v == 0 else _e2b_json(v) for v in value]
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str):
        return str(value)
    if isinstance(value, _e2b_numbers.Integral):
        return int(value)
    if isinstance(value, (float, _e2b_numbers.Real, _e2b_decimal.Decimal)):
        try:
            number = float(value)
        except (TypeError, ValueError):  # a signalling NaN among Decimals
            return None
        return number if _e2b_math.isfinite(number) else None
    if isinstance(value, dict):
        return {(k if isinstance(k, str) else str(k)): _e2b_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return _e2b_json(list(value))
    pandas = sys.modules.get("pandas")
    if pandas is not None and (value is pandas.NaT or value is pandas.NA):
        return None
    if isinstance(value, (_e2b_datetime.datetime, _e2b_datetime.date, _e2b_datetime.time)):
        return value.isoformat()
    if isinstance(value, (bytes, bytearray)):
        return base64.b64encode(bytes(value)).decode("ascii")
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        if isinstance(value, numpy.datetime64):
            return None if numpy.isnat(value) else str(value)
        if isinstance(value, numpy.ndarray):
            return _e2b_json(value.tolist())
        if isinstance(value, numpy.generic):
            return _e2b_json(value.item())
    return str(value)


# ---------------------------------------------------------------------------------------------
# Charts


def _e2b_chart(fig):
    """The chart dict of a matplotlib figure, or None if none of its axes has data."""
    axes = fig.get_axes()
    if not any(ax.has_data() for ax in axes):
        return None
    points = 0
    for ax in axes:
        for line in ax.get_lines():
            points += len(line.get_xdata())
        for collection in ax.collections:
            points += len(collection.get_offsets())
    if points * _E2B_POINT_BYTES > _E2B_MAX_BYTES:
        raise _E2bTooLarge(f"{points} points")
    if len(axes) > 1:
        return {"type": "superchart", "title": fig.get_suptitle(),
                "elements": [_e2b_axes_chart(ax) for ax in axes]}
    return _e2b_axes_chart(axes[0])


def _e2b_kind(ax):
    """The chart type of an axes, from the artists on it (its texts aside)."""
    from matplotlib.collections import PathCollection
    from matplotlib.lines import Line2D
    from matplotlib.patches import PathPatch, Rectangle, Wedge
    from matplotlib.text import Text

    artists = [a for a in ax._children if not isinstance(a, Text)]
    if all(isinstance(a, Line2D) for a in artists):
        return "line"
    # Only `boxplot(patch_artist=True)` draws its boxes as patches; a plain one is all lines.
    if all(isinstance(a, (PathPatch, Line2D)) for a in artists):
        return "box_and_whisker"
    artists = [a for a in artists if not (isinstance(a, Line2D) and _e2b_grid_line(a))]
    for kind, cls in (("scatter", PathCollection), ("pie", Wedge), ("bar", Rectangle)):
        if all(isinstance(a, cls) for a in artists):
            return kind
    return "unknown"


def _e2b_grid_line(line):
    """A line of two points, vertical or horizontal (a grid line, `axhline`, `axvline`)."""
    xs, ys = line.get_xdata(), line.get_ydata()
    if len(xs) != 2 or len(ys) != 2:
        return False
    return bool(xs[0] == xs[1] or ys[0] == ys[1])


def _e2b_axes_chart(ax):
    """The chart of one axes; an `unknown` one has only its title."""
    kind = _e2b_kind(ax)
    chart = {"type": kind, "title": ax.get_title() or None, "elements": []}
    build = _E2B_BUILDERS.get(kind)
    if build is not None:
        build(ax, chart)
    return chart


def _e2b_labels(ax, chart):
    """The keys of a 2-D chart: axis labels (None if empty) and the units in them ("Revenue
    (USD)" → "USD", "Count [n]" → "n")."""
    for axis, label in (("x", ax.get_xlabel()), ("y", ax.get_ylabel())):
        chart[f"{axis}_label"] = label or None
    for axis in ("x", "y"):
        label = chart[f"{axis}_label"]
        match = _E2B_UNIT.search(label) if label else None
        chart[f"{axis}_unit"] = (match.group(1) or match.group(2)) if match else None


def _e2b_swap_axes(chart):
    for a, b in (("x_label", "y_label"), ("x_unit", "y_unit")):
        chart[a], chart[b] = chart[b], chart[a]


def _e2b_date_converter(converter):
    import matplotlib.dates as mdates
    kinds = tuple(getattr(mdates, name) for name in
                  ("_SwitchableDateConverter", "DateConverter", "ConciseDateConverter")
                  if hasattr(mdates, name))
    return isinstance(converter, kinds)


def _e2b_ticks(ax, chart):
    """The keys of a point chart: each axis's ticks (ISO strings on a date axis), their labels
    and its scale (`datetime`, `categorical` when the ticks are 0..n-1 labelled otherwise, or
    matplotlib's scale name)."""
    import matplotlib.dates as mdates
    for axis, obj in (("x", ax.xaxis), ("y", ax.yaxis)):
        getter = getattr(obj, "get_converter", None)
        converter = getter() if getter is not None else obj.converter
        labels = [t.get_text() for t in obj.get_ticklabels()]
        ticks = list(obj.get_ticklocs())
        dated = _e2b_date_converter(converter)
        if dated:
            ticks = [mdates.num2date(t).isoformat() for t in ticks]
        elif ticks and isinstance(ticks[0], (int, float)):
            ticks = [float(t) for t in ticks]
        if dated:
            scale = "datetime"
        elif obj.get_scale() != "linear":
            scale = obj.get_scale()
        elif ticks and all(isinstance(t, (int, float)) and t == i and str(i) != label
                           for i, (t, label) in enumerate(zip(ticks, labels))):
            scale = "categorical"
        else:
            scale = "linear"
        chart[f"{axis}_ticks"], chart[f"{axis}_tick_labels"] = ticks, labels
        chart[f"{axis}_scale"] = scale


def _e2b_point(value):
    """One coordinate of a line or scatter point: dates as ISO strings, strings kept, numbers
    as floats."""
    if isinstance(value, _e2b_datetime.date):
        return value.isoformat()
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        if isinstance(value, numpy.datetime64):
            return str(value.astype("datetime64[s]"))
        if value is numpy.ma.masked:
            return None
    if isinstance(value, str) or value is None:
        return value
    return float(value)


def _e2b_point_chart(ax, chart):
    _e2b_labels(ax, chart)
    _e2b_ticks(ax, chart)


def _e2b_line(ax, chart):
    _e2b_point_chart(ax, chart)
    for line in ax.get_lines():
        if _e2b_grid_line(line):
            continue
        label = line.get_label()
        if label.startswith("_child"):
            label = f"Line {int(label[len('_child'):])}"
        points = [[_e2b_point(x), _e2b_point(y)]
                  for x, y in zip(line.get_xdata(), line.get_ydata())]
        chart["elements"].append({"label": label, "points": points})


def _e2b_scatter(ax, chart):
    _e2b_point_chart(ax, chart)
    for collection in ax.collections:
        offsets = collection.get_offsets()
        if hasattr(offsets, "filled"):  # a masked array: its masked points as NaN (null)
            offsets = offsets.filled(float("nan"))
        points = [[_e2b_point(x), _e2b_point(y)] for x, y in offsets]
        chart["elements"].append({"label": collection.get_label(), "points": points})


def _e2b_bar(ax, chart):
    _e2b_labels(ax, chart)
    for container in ax.containers:
        group = container.get_label()
        if group.startswith("_container"):
            group = f"Group {int(group[len('_container'):])}"
        heights = [bar.get_height() for bar in container]
        if all(h == heights[0] for h in heights):
            # Bars of one height are taken for horizontal ones (`barh`), as e2b-charts does:
            # labels from the y axis, values the widths, and the axes' names swapped (once per
            # container, as there).
            _e2b_swap_axes(chart)
            labels = [t.get_text() for t in ax.get_yticklabels()]
            values = [bar.get_width() for bar in container]
        else:
            labels = [t.get_text() for t in ax.get_xticklabels()]
            values = heights
        for label, value in zip(labels, values):
            chart["elements"].append({"label": label, "group": group, "value": float(value)})


def _e2b_round(number):
    """`number` as a Decimal rounded to about 8 significant digits (e2b-charts' rounding of box
    and pie values, kept so the same figure gives the same numbers)."""
    d = _e2b_decimal.Decimal(str(number))
    with _e2b_decimal.localcontext() as context:
        context.prec = max(1, 8 - d.adjusted())
        return +d


def _e2b_pie(ax, chart):
    Decimal = _e2b_decimal.Decimal
    for wedge in ax.patches:
        angle = _e2b_round(Decimal(float(wedge.theta2)) - Decimal(float(wedge.theta1)))
        chart["elements"].append({"label": wedge.get_label(), "angle": float(abs(angle)),
                                  "radius": float(wedge.r)})


def _e2b_box(ax, chart):
    """Boxes from the patches (their extent: the quartiles), then the lines: one-point lines are
    outliers, level lines inside a box its median, lines leaving a box's edge its whiskers."""
    _e2b_labels(ax, chart)
    labels = [t.get_text() for t in ax.get_xticklabels()]
    extents = []
    for label, patch in zip(labels, ax.patches):
        vertices = patch.get_path().vertices
        xs = [_e2b_round(v) for v in vertices[:, 0]]
        ys = [_e2b_round(v) for v in vertices[:, 1]]
        extents.append((label, min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)))
    lines = [([_e2b_round(v) for v in line.get_xdata()], [_e2b_round(v) for v in line.get_ydata()])
             for line in ax.lines]
    # As e2b-charts: boxes of one height are taken as the boxes of `orientation="horizontal"`,
    # and the axes swapped. Where e2b-charts fails (no chart at all), two more tries: a single
    # box always has "one height", and a vertical one then finds no whiskers, so the other
    # orientation; and a whisker of length 0 (no data beyond a quartile) is taken for a median,
    # so a box left without a whisker has it at its quartile. There the orientation is taken
    # from the ticks if they tell (boxplot fixes one at each box's centre, on the axis across
    # the boxes): a box with no height can be read either way.
    from matplotlib.ticker import FixedLocator
    upstream = all(e[4] == extents[0][4] for e in extents)
    across = []
    for axis in (ax.xaxis, ax.yaxis):
        fixed = isinstance(axis.get_major_locator(), FixedLocator)
        across.append({_e2b_round(t) for t in axis.get_ticklocs()} if fixed else set())
    vertical = all(x + width / 2 in across[0] for _, x, _, width, _ in extents)
    horizontal = all(y + height / 2 in across[1] for _, _, y, _, height in extents)
    first = horizontal and not vertical
    for swapped, lenient in ((upstream, False), (not upstream, False), (first, True),
                             (not first, True)):
        elements = _e2b_boxes(extents, lines, swapped, lenient)
        if elements is not None:
            break
    else:
        raise ValueError("the boxes' medians and whiskers were not found")
    if swapped:
        _e2b_swap_axes(chart)
    chart["elements"] = elements


def _e2b_boxes(extents, lines, swapped, lenient):
    """The elements of a box chart, its axes swapped or not; None if a box lacks its median or
    (unless `lenient`) a whisker."""
    boxes = []
    for label, x, y, width, height in extents:
        if swapped:
            x, y, width, height = y, x, height, width
        boxes.append({"label": label, "x": x, "y": y, "width": width, "height": height,
                      "outliers": []})
    for xs, ys in lines:
        if swapped:
            xs, ys = ys, xs
        if len(xs) == 1:
            box = next((b for b in boxes if b["x"] <= xs[0] <= b["x"] + b["width"]), None)
            if box is not None:
                box["outliers"].append(ys[0])
            continue
        if len(ys) != 2:
            continue
        box = next((b for b in boxes if b["x"] <= xs[0] <= xs[1] <= b["x"] + b["width"]), None)
        if box is None:
            continue
        if ys[0] == ys[1] and box["y"] <= ys[0] <= box["y"] + box["height"]:
            # Leniently, only a line across the whole box is its median (so a box is not read
            # with its axes the wrong way round).
            if not lenient or (xs[0], xs[1]) == (box["x"], box["x"] + box["width"]):
                box["median"] = ys[0]
            continue
        low, high = min(ys), max(ys)
        if high == box["y"]:
            box["whisker_lower"] = low
        elif low == box["y"] + box["height"]:
            box["whisker_upper"] = high
    if lenient:
        for box in boxes:
            box.setdefault("whisker_lower", box["y"])
            box.setdefault("whisker_upper", box["y"] + box["height"])
    if any(k not in box for box in boxes for k in ("median", "whisker_lower", "whisker_upper")):
        return None
    return [{"label": box["label"], "min": float(box["whisker_lower"]),
             "first_quartile": float(box["y"]), "median": float(box["median"]),
             "third_quartile": float(box["y"] + box["height"]),
             "max": float(box["whisker_upper"]), "outliers": [float(v) for v in box["outliers"]]}
            for box in boxes]


_E2B_BUILDERS = {"line": _e2b_line, "scatter": _e2b_scatter, "bar": _e2b_bar, "pie": _e2b_pie,
                 "box_and_whisker": _e2b_box}
