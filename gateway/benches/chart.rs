//! Draws the benchmark results as a PNG bar chart, Sandgate beside the reference.
//!
//! ```text
//! cargo bench -p sandgate --bench chart -- "$PWD/kernel.json" "$PWD/gateway.json" "$PWD/out.png"
//! ```
//!
//! (`cargo bench` runs it in `gateway/`, so relative paths would be taken from there.)
//!
//! The inputs are the `--json` files of `kernel/benches/bench_kernel.py` and
//! `gateway/benches/bench_gateway.py` (any number of them, in that shape). Every metric with a
//! `chart` entry (`{"panel": ..., "label": ...}`) becomes a pair of bars in its panel: start to
//! idle, round trip, memory per idle kernel. Each bar carries its value, each pair its ratio.
//! Text is drawn with DejaVu Sans from the `dejavu` crate, so no system font or fontconfig is
//! needed.

use std::path::Path;

use anyhow::{Context, Result, bail};
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use serde_json::Value;

/// The panels, in order: the `chart.panel` key in the JSON and the panel's title.
const PANELS: [(&str, &str); 3] = [
    ("start", "Start to idle (median)"),
    ("roundtrip", "Round trip of `1+1` (median)"),
    ("memory", "Memory per idle kernel (PSS)"),
];
const SIZE: (u32, u32) = (1600, 620);
const SANDGATE: RGBColor = RGBColor(0x1f, 0x77, 0xb4);
const REFERENCE: RGBColor = RGBColor(0xa0, 0xa0, 0xa0);
const FONT: &str = "sans-serif";

/// One charted metric: a pair of bars.
struct Pair {
    panel: String,
    label: String,
    reference_name: String,
    unit: String,
    sandgate: f64,
    reference: f64,
}

fn main() -> Result<()> {
    // `cargo bench` adds `--bench`; only the file names matter.
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let Some((output, inputs)) = args.split_last().filter(|(_, inputs)| !inputs.is_empty()) else {
        bail!("usage: cargo bench -p sandgate --bench chart -- RESULTS.json... OUT.png");
    };
    let mut pairs = Vec::new();
    for input in inputs {
        pairs.extend(read_pairs(Path::new(input)).with_context(|| format!("reading {input}"))?);
    }
    if pairs.is_empty() {
        bail!(
            "no charted metric with both values in {}",
            inputs.join(", ")
        );
    }
    plotters::style::register_font(FONT, FontStyle::Normal, dejavu::sans::regular())
        .map_err(|_| anyhow::anyhow!("the bundled DejaVu Sans font did not load"))?;
    draw(Path::new(output), &pairs).with_context(|| format!("drawing {output}"))?;
    println!("wrote {output}");
    Ok(())
}

/// The charted metrics of one results file that have both a Sandgate and a reference value.
fn read_pairs(path: &Path) -> Result<Vec<Pair>> {
    let results: Value = serde_json::from_slice(&std::fs::read(path)?)?;
    let reference_name = results["reference"]
        .as_str()
        .unwrap_or("reference")
        .to_owned();
    let metrics = results["metrics"].as_array().context("no `metrics` list")?;
    Ok(metrics
        .iter()
        .filter_map(|m| {
            let chart = m.get("chart").filter(|c| c.is_object())?;
            Some(Pair {
                panel: chart["panel"].as_str()?.to_owned(),
                label: chart["label"].as_str()?.to_owned(),
                reference_name: reference_name.clone(),
                unit: m["unit"].as_str().unwrap_or_default().to_owned(),
                sandgate: m["sandgate"].as_f64()?,
                reference: m["reference"].as_f64()?,
            })
        })
        .collect())
}

fn draw(output: &Path, pairs: &[Pair]) -> Result<()> {
    let root = BitMapBackend::new(output, SIZE).into_drawing_area();
    root.fill(&WHITE)?;
    let (top, body) = root.split_vertically(70);
    top.draw_text(
        "Sandgate against the reference (lower is better)",
        &(FONT, 26).into_font().color(&BLACK),
        (20, 14),
    )?;
    let mut reference_names: Vec<&str> = Vec::new();
    for p in pairs {
        if !reference_names.contains(&p.reference_name.as_str()) {
            reference_names.push(&p.reference_name);
        }
    }
    legend(&top, &format!("reference: {}", reference_names.join(" / ")))?;
    let panels: Vec<(&str, Vec<&Pair>)> = PANELS
        .iter()
        .map(|(key, title)| (*title, pairs.iter().filter(|p| p.panel == *key).collect()))
        .collect();
    // Each panel is as wide as its pairs of bars (at least two), plus one pair's width for its axis.
    let weights: Vec<usize> = panels.iter().map(|(_, p)| p.len().max(2) + 1).collect();
    let total: usize = weights.iter().sum();
    let width = body.dim_in_pixel().0 as usize;
    let breaks: Vec<i32> = weights[..weights.len() - 1]
        .iter()
        .scan(0, |sum, w| {
            *sum += w;
            Some((width * *sum / total) as i32)
        })
        .collect();
    let areas = body.split_by_breakpoints(breaks, [0i32; 0]);
    for (area, (title, in_panel)) in areas.iter().zip(&panels) {
        panel(&root, area, title, in_panel)?;
    }
    root.present()?;
    Ok(())
}

fn legend(area: &DrawingArea<BitMapBackend, Shift>, reference: &str) -> Result<()> {
    let text = (FONT, 16).into_font().color(&BLACK);
    let x = SIZE.0 as i32 / 2;
    for (i, (name, color)) in [("Sandgate", SANDGATE), (reference, REFERENCE)]
        .into_iter()
        .enumerate()
    {
        let y = 12 + 24 * i as i32;
        area.draw(&Rectangle::new([(x, y), (x + 20, y + 16)], color.filled()))?;
        area.draw_text(name, &text, (x + 30, y))?;
    }
    Ok(())
}

/// One panel: a pair of bars per metric, on its own scale. Labels under the axis are drawn on
/// `root` at the pixel positions the chart maps to.
fn panel(
    root: &DrawingArea<BitMapBackend, Shift>,
    area: &DrawingArea<BitMapBackend, Shift>,
    title: &str,
    pairs: &[&Pair],
) -> Result<()> {
    let unit = pairs.first().map(|p| p.unit.as_str()).unwrap_or_default();
    let top = pairs
        .iter()
        .map(|p| p.sandgate.max(p.reference))
        .fold(0.0, f64::max);
    let top = if top > 0.0 { top * 1.2 } else { 1.0 };
    let mut chart = ChartBuilder::on(area)
        .caption(title, (FONT, 20))
        .margin(15)
        .x_label_area_size(70)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..pairs.len().max(1) as f64, 0.0..top)?;
    let decimals = if top >= 10.0 { 0 } else { 1 };
    chart
        .configure_mesh()
        .disable_x_mesh()
        .light_line_style(TRANSPARENT)
        .x_labels(0)
        .y_label_formatter(&|v| format!("{v:.decimals$}"))
        .y_desc(unit)
        .label_style((FONT, 14))
        .draw()?;
    if pairs.is_empty() {
        chart.draw_series([Text::new(
            "no data",
            (0.5, top / 2.0),
            (FONT, 16)
                .into_font()
                .color(&BLACK)
                .pos(Pos::new(HPos::Center, VPos::Center)),
        )])?;
        return Ok(());
    }
    let value_style = (FONT, 14)
        .into_font()
        .color(&BLACK)
        .pos(Pos::new(HPos::Center, VPos::Bottom));
    let label_style = (FONT, 14)
        .into_font()
        .color(&BLACK)
        .pos(Pos::new(HPos::Center, VPos::Top));
    for (i, p) in pairs.iter().enumerate() {
        let x = i as f64;
        for (left, value, color) in [
            (x + 0.12, p.sandgate, SANDGATE),
            (x + 0.5, p.reference, REFERENCE),
        ] {
            chart.draw_series([Rectangle::new(
                [(left, 0.0), (left + 0.38, value)],
                color.filled(),
            )])?;
            chart.draw_series([Text::new(
                format!("{} {}", number(value), p.unit),
                (left + 0.19, value),
                value_style.clone(),
            )])?;
        }
        let (cx, cy) = chart.backend_coord(&(x + 0.5, 0.0));
        // One line per comma-separated part of the label, then the ratio.
        let ratio = format!("ratio {:.2}", p.sandgate / p.reference);
        let lines = p.label.split(", ").chain([ratio.as_str()]);
        for (n, line) in lines.enumerate() {
            root.draw(&Text::new(
                line,
                (cx, cy + 8 + 18 * n as i32),
                label_style.clone(),
            ))?;
        }
    }
    Ok(())
}

/// A value with about three significant digits.
fn number(v: f64) -> String {
    match v {
        v if v >= 100.0 => format!("{v:.0}"),
        v if v >= 10.0 => format!("{v:.1}"),
        v => format!("{v:.2}"),
    }
}
