//! A report's charts as PNG, drawn in-process with plotters' bitmap backend
//! and the bundled DejaVu Sans (`assets/fonts/`, registered through
//! plotters' `ab_glyph` font table): no system fonts, no C libraries, no
//! browser. Each chart is at least [`WIDTH`] pixels wide, with a title that
//! carries the period, and axis labels with units. A chart with nothing to
//! show is left out; a chart that cannot be drawn is logged and left out.

use std::sync::OnceLock;

use chrono::{DateTime, Utc};
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use crate::config::reports::ReportConfig;
use crate::message::Chart;
use crate::report::render::fmt_local;
use crate::report::Figures;

/// Chart size in pixels (readable at chat-preview size).
pub const WIDTH: u32 = 1000;
pub const HEIGHT: u32 = 520;
/// Nodes a bar chart shows (the most first).
pub const TOP_NODES: usize = 15;

const FONT: &[u8] = include_bytes!("../../assets/fonts/DejaVuSans.ttf");
const FAMILY: &str = "sans-serif";

/// Registers the bundled font once; `false` if it could not be read.
fn font_ready() -> bool {
    static READY: OnceLock<bool> = OnceLock::new();
    *READY.get_or_init(|| plotters::style::register_font(FAMILY, FontStyle::Normal, FONT).is_ok())
}

/// `27 Nov 08:00 – 28 Nov 08:00 (Europe/Berlin)`.
fn period_text(cfg: &ReportConfig, at: DateTime<Utc>) -> String {
    let end = at.timestamp() as f64;
    let start = end - cfg.period.as_secs_f64();
    format!(
        "{} – {} ({})",
        fmt_local(cfg.timezone, start),
        fmt_local(cfg.timezone, end),
        cfg.timezone.name()
    )
}

/// Every chart the figures allow.
pub fn render_all(cfg: &ReportConfig, at: DateTime<Utc>, f: &Figures) -> Vec<Chart> {
    let period = period_text(cfg, at);
    let mut out = Vec::new();
    let mut push = |file: &str, title: &str, png: Result<Vec<u8>, String>| match png {
        Ok(png) => out.push(Chart {
            file_name: file.to_string(),
            title: title.to_string(),
            png,
        }),
        Err(e) => {
            tracing::warn!(report = %cfg.name, chart = file, error = %e, "cannot draw a report chart")
        }
    };
    if !f.utilization_series.is_empty() {
        let title = "Fleet GPU utilization";
        let end = at.timestamp() as f64;
        let start = end - cfg.period.as_secs_f64();
        push(
            "fleet-gpu-utilization.png",
            title,
            utilization_chart(
                &format!("{title}, {period}"),
                &f.utilization_series,
                (start, end),
                cfg.timezone,
            ),
        );
    }
    if !f.idle_gpu_hours.is_empty() {
        let title = "Idle GPU-hours per node";
        let rows: Vec<(String, Vec<f64>)> = f
            .idle_gpu_hours
            .iter()
            .map(|(n, h)| (f.node_name(n).to_string(), vec![*h as f64]))
            .collect();
        let bars = top_with_others(&rows, TOP_NODES);
        push(
            "idle-gpu-hours.png",
            title,
            bar_chart(
                &format!("{title} (under 5 % for a whole hour), {period}"),
                "Idle GPU-hours (h)",
                &bars,
                &[("idle GPU-hours", RGBColor(0x4c, 0x78, 0xa8))],
            ),
        );
    }
    let mut errors: Vec<(String, [u64; 3])> = f
        .errors_per_node
        .iter()
        .filter(|(_, e)| e.iter().sum::<u64>() > 0)
        .cloned()
        .collect();
    if !errors.is_empty() {
        errors.sort_by(|x, y| {
            y.1.iter()
                .sum::<u64>()
                .cmp(&x.1.iter().sum::<u64>())
                .then_with(|| x.0.cmp(&y.0))
        });
        let title = "GPU errors per node";
        let rows: Vec<(String, Vec<f64>)> = errors
            .iter()
            .map(|(n, e)| {
                (
                    f.node_name(n).to_string(),
                    e.iter().map(|v| *v as f64).collect(),
                )
            })
            .collect();
        let bars = top_with_others(&rows, TOP_NODES);
        push(
            "gpu-errors-per-node.png",
            title,
            bar_chart(
                &format!("{title}, {period}"),
                "Errors (count)",
                &bars,
                &[
                    ("XIDs", RGBColor(0xe1, 0x57, 0x59)),
                    ("uncorrectable ECC", RGBColor(0xf2, 0x8e, 0x2b)),
                    ("NVLink + PCIe replay", RGBColor(0x76, 0xb7, 0xb2)),
                ],
            ),
        );
    }
    out
}

fn encode_png(rgb: &[u8], width: u32, height: u32) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut out, width, height);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        let mut w = enc.write_header().map_err(|e| e.to_string())?;
        w.write_image_data(rgb).map_err(|e| e.to_string())?;
    }
    Ok(out)
}

/// Fleet utilization over time: a line, percent against local time.
pub fn utilization_chart(
    caption: &str,
    points: &[(f64, f64)],
    (start, end): (f64, f64),
    tz: chrono_tz::Tz,
) -> Result<Vec<u8>, String> {
    if !font_ready() {
        return Err("the bundled font cannot be read".into());
    }
    let mut buf = vec![255u8; (WIDTH * HEIGHT * 3) as usize];
    // The x axis counts hours (days for more than two days) from the
    // period's start, so its labels fall on whole hours (days).
    let unit = if end - start > 2.0 * 86_400.0 {
        86_400.0
    } else {
        3600.0
    };
    let span = (end - start) / unit;
    {
        let root = BitMapBackend::with_buffer(&mut buf, (WIDTH, HEIGHT)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| e.to_string())?;
        let mut chart = ChartBuilder::on(&root)
            .caption(caption, (FAMILY, 22))
            .margin(16)
            .x_label_area_size(56)
            .y_label_area_size(70)
            .build_cartesian_2d(0f64..span, 0f64..100f64)
            .map_err(|e| e.to_string())?;
        let fmt_x = |x: &f64| {
            DateTime::from_timestamp((start + x * unit).round() as i64, 0)
                .map(|t| {
                    let t = t.with_timezone(&tz);
                    if unit > 3600.0 {
                        t.format("%-d %b").to_string()
                    } else {
                        t.format("%H:%M").to_string()
                    }
                })
                .unwrap_or_default()
        };
        chart
            .configure_mesh()
            .x_labels(13)
            .y_labels(6)
            .x_label_formatter(&fmt_x)
            .y_label_formatter(&|y: &f64| format!("{y:.0}"))
            .x_desc(format!("Time ({})", tz.name()))
            .y_desc("GPU utilization (%)")
            .label_style((FAMILY, 15))
            .axis_desc_style((FAMILY, 16))
            .light_line_style(RGBColor(0xee, 0xee, 0xee))
            .draw()
            .map_err(|e| e.to_string())?;
        let series: Vec<(f64, f64)> = points
            .iter()
            .filter(|(t, v)| t.is_finite() && v.is_finite())
            .map(|(t, v)| ((*t - start) / unit, v.clamp(0.0, 100.0)))
            .collect();
        chart
            .draw_series(LineSeries::new(
                series,
                RGBColor(0x4c, 0x78, 0xa8).stroke_width(3),
            ))
            .map_err(|e| e.to_string())?;
        root.present().map_err(|e| e.to_string())?;
    }
    encode_png(&buf, WIDTH, HEIGHT)
}

/// Longest label shown beside a bar, in characters.
const LABEL_CHARS: usize = 28;

/// The first `top` rows (already in order, the largest first) and, when
/// there are more, one row for the rest: `"485 others (each ≤ 3)"`, drawn
/// as long as the largest of them, so the top rows stay readable (a sum
/// of hundreds of nodes would dwarf them).
pub fn top_with_others(rows: &[(String, Vec<f64>)], top: usize) -> Vec<(String, Vec<f64>)> {
    if rows.len() <= top {
        return rows.to_vec();
    }
    let (shown, rest) = rows.split_at(top);
    let total = |v: &[f64]| v.iter().filter(|x| x.is_finite()).sum::<f64>();
    let largest = rest
        .iter()
        .max_by(|x, y| total(&x.1).total_cmp(&total(&y.1)))
        .map(|(_, v)| v.clone())
        .unwrap_or_default();
    let mut out = shown.to_vec();
    out.push((
        format!(
            "{} other{} (each ≤ {})",
            rest.len(),
            if rest.len() == 1 { "" } else { "s" },
            crate::report::render::fmt_num(total(&largest))
        ),
        largest,
    ));
    out
}

/// A bar's label: at most [`LABEL_CHARS`] characters.
fn bar_label(s: &str) -> String {
    if s.chars().count() > LABEL_CHARS {
        format!("{}…", s.chars().take(LABEL_CHARS - 1).collect::<String>())
    } else {
        s.to_string()
    }
}

/// Horizontal bars per node (the first the longest, at the top), stacked
/// when there are several `kinds`, each labelled with its name on the
/// left. One bar fills its row as any bar of many does; pass at most
/// [`TOP_NODES`] + 1 bars ([`top_with_others`]).
pub fn bar_chart(
    caption: &str,
    x_desc: &str,
    bars: &[(String, Vec<f64>)],
    kinds: &[(&str, RGBColor)],
) -> Result<Vec<u8>, String> {
    if !font_ready() {
        return Err("the bundled font cannot be read".into());
    }
    let n = bars.len().max(1);
    let max = bars
        .iter()
        .map(|(_, v)| v.iter().filter(|x| x.is_finite()).sum::<f64>())
        .fold(0.0f64, f64::max)
        .max(1.0)
        .ceil();
    let names: Vec<String> = bars.iter().map(|(n, _)| bar_label(n)).collect();
    let label_width = names
        .iter()
        .map(|s| s.chars().count())
        .max()
        .unwrap_or(4)
        .clamp(4, LABEL_CHARS) as u32
        * 9
        + 24;
    let mut buf = vec![255u8; (WIDTH * HEIGHT * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut buf, (WIDTH, HEIGHT)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| e.to_string())?;
        // Row `i` (0 at the bottom) spans [i, i + 1); the first bar is the
        // top row.
        let mut chart = ChartBuilder::on(&root)
            .caption(caption, (FAMILY, 22))
            .margin(16)
            .x_label_area_size(56)
            .y_label_area_size(label_width)
            .build_cartesian_2d(0f64..max * 1.1, 0f64..n as f64)
            .map_err(|e| e.to_string())?;
        chart
            .configure_mesh()
            .y_labels(0)
            .x_labels((max as usize + 1).min(11))
            .x_label_formatter(&|x: &f64| crate::report::render::fmt_num(*x))
            .x_desc(x_desc)
            .label_style((FAMILY, 15))
            .axis_desc_style((FAMILY, 16))
            .disable_y_mesh()
            .light_line_style(RGBColor(0xee, 0xee, 0xee))
            .draw()
            .map_err(|e| e.to_string())?;
        let row_of = |rank: usize| (n - 1 - rank) as f64;
        for (k, (label, color)) in kinds.iter().enumerate() {
            let color = *color;
            let rects: Vec<Rectangle<(f64, f64)>> = bars
                .iter()
                .enumerate()
                .filter_map(|(rank, (_, values))| {
                    let v = *values.get(k)?;
                    if v.is_nan() || v <= 0.0 || v.is_infinite() {
                        return None;
                    }
                    let from: f64 = values.iter().take(k).filter(|x| x.is_finite()).sum();
                    let i = row_of(rank);
                    Some(Rectangle::new(
                        [(from, i + 0.15), (from + v, i + 0.85)],
                        color.filled(),
                    ))
                })
                .collect();
            let anno = chart.draw_series(rects).map_err(|e| e.to_string())?;
            if kinds.len() > 1 {
                anno.label(*label).legend(move |(x, y)| {
                    Rectangle::new([(x, y - 6), (x + 14, y + 6)], color.filled())
                });
            }
        }
        // Each bar's name, right-aligned against the axis at its row's middle.
        let style = TextStyle::from((FAMILY, 15).into_font())
            .color(&BLACK)
            .pos(Pos::new(HPos::Right, VPos::Center));
        for (rank, name) in names.iter().enumerate() {
            let (x, y) = chart.backend_coord(&(0.0, row_of(rank) + 0.5));
            root.draw(&Text::new(name.clone(), (x - 8, y), style.clone()))
                .map_err(|e| e.to_string())?;
        }
        if kinds.len() > 1 {
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::LowerRight)
                .label_font((FAMILY, 15))
                .background_style(WHITE.mix(0.9))
                .border_style(RGBColor(0xcc, 0xcc, 0xcc))
                .draw()
                .map_err(|e| e.to_string())?;
        }
        root.present().map_err(|e| e.to_string())?;
    }
    encode_png(&buf, WIDTH, HEIGHT)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(png_bytes: &[u8]) -> (u32, u32, Vec<u8>) {
        let dec = png::Decoder::new(std::io::Cursor::new(png_bytes));
        let mut r = dec.read_info().unwrap();
        let mut buf = vec![0; r.output_buffer_size()];
        let info = r.next_frame(&mut buf).unwrap();
        (info.width, info.height, buf)
    }

    #[test]
    fn charts_decode_at_their_size_and_are_not_blank() {
        let pts: Vec<(f64, f64)> = (0..100)
            .map(|i| (i as f64 * 60.0, (i % 50) as f64))
            .collect();
        let png = utilization_chart(
            "Fleet GPU utilization, test",
            &pts,
            (0.0, 6000.0),
            chrono_tz::Tz::UTC,
        )
        .unwrap();
        let (w, h, px) = decode(&png);
        assert_eq!((w, h), (WIDTH, HEIGHT));
        assert!(px.iter().any(|b| *b < 128), "something dark is drawn");
        let bars = vec![
            ("node-a:9949".to_string(), vec![3.0, 1.0, 0.0]),
            ("node-b:9949".to_string(), vec![0.0, 0.0, 2.0]),
        ];
        let png = bar_chart(
            "GPU errors per node, test",
            "Errors (count)",
            &bars,
            &[("XIDs", RED), ("ECC", BLUE), ("links", GREEN)],
        )
        .unwrap();
        assert_eq!(decode(&png).0, WIDTH);
        let one = bar_chart("one", "h", &bars[..1], &[("idle", BLUE)]).unwrap();
        assert_eq!(decode(&one).0, WIDTH);
    }

    const BAR: RGBColor = RGBColor(0x4c, 0x78, 0xa8);

    /// The pixels of `color`: `(x, y)`.
    fn pixels_of(png: &[u8], color: RGBColor) -> (u32, Vec<(u32, u32)>) {
        let (w, h, px) = decode(png);
        assert_eq!((w, h), (WIDTH, HEIGHT));
        let mut out = Vec::new();
        for y in 0..h {
            for x in 0..w {
                let i = ((y * w + x) * 3) as usize;
                if px[i..i + 3] == [color.0, color.1, color.2] {
                    out.push((x, y));
                }
            }
        }
        (w, out)
    }

    /// Rows `(top, bottom)` where column `x` is `color`, top to bottom.
    fn runs_in_column(png: &[u8], color: RGBColor, x: u32) -> Vec<(u32, u32)> {
        let (_, pixels) = pixels_of(png, color);
        let mut ys: Vec<u32> = pixels.iter().filter(|p| p.0 == x).map(|p| p.1).collect();
        ys.sort();
        let mut runs: Vec<(u32, u32)> = Vec::new();
        for y in ys {
            match runs.last_mut() {
                Some(r) if r.1 + 1 == y => r.1 = y,
                _ => runs.push((y, y)),
            }
        }
        runs
    }

    /// Whether text is drawn left of `x` between rows `top` and `bottom`.
    fn dark_left_of(png: &[u8], x: u32, top: u32, bottom: u32) -> usize {
        let (w, _, px) = decode(png);
        let mut n = 0;
        for y in top..=bottom {
            for xx in x.saturating_sub(260)..x.saturating_sub(10) {
                let i = ((y * w + xx) * 3) as usize;
                if px[i] < 110 && px[i + 1] < 110 && px[i + 2] < 110 {
                    n += 1;
                }
            }
        }
        n
    }

    #[test]
    fn bar_chart_with_one_node_has_a_full_labelled_bar() {
        let bars = vec![("gpu-node-17".to_string(), vec![29.0])];
        let png = bar_chart("Idle GPU-hours, test", "h", &bars, &[("idle", BAR)]).unwrap();
        let (_, pixels) = pixels_of(&png, BAR);
        assert!(!pixels.is_empty(), "no bar drawn");
        let x0 = pixels.iter().map(|p| p.0).min().unwrap();
        let x1 = pixels.iter().map(|p| p.0).max().unwrap();
        let y0 = pixels.iter().map(|p| p.1).min().unwrap();
        let y1 = pixels.iter().map(|p| p.1).max().unwrap();
        // The one row takes the plot's height (about 390 px), the bar 70 % of it.
        assert!(y1 - y0 > 200, "bar rows {y0}..{y1}: a thin strip");
        // 29 of an axis to 29 × 1.1: the bar is most of the plot's width.
        let plot = WIDTH - 32 - x0;
        let ratio = f64::from(x1 - x0 + 1) / f64::from(plot);
        assert!(
            (0.85..0.95).contains(&ratio),
            "bar {x0}..{x1} of {plot} px: {ratio}"
        );
        // Its name is written beside it, at its middle.
        let mid = (y0 + y1) / 2;
        assert!(
            dark_left_of(&png, x0, mid - 10, mid + 10) > 30,
            "no label left of the bar"
        );
    }

    #[test]
    fn bar_chart_with_500_nodes_shows_top_n_and_others() {
        // Node i has 500 - i idle hours: the top 15 are 500 … 486.
        let rows: Vec<(String, Vec<f64>)> = (0..500)
            .map(|i| (format!("gpu-node-{i:03}"), vec![(500 - i) as f64]))
            .collect();
        let bars = top_with_others(&rows, TOP_NODES);
        assert_eq!(bars.len(), TOP_NODES + 1);
        assert_eq!(bars[0].0, "gpu-node-000");
        assert_eq!(bars[TOP_NODES].0, "485 others (each ≤ 485)");
        assert_eq!(bars[TOP_NODES].1, vec![485.0]);
        let png = bar_chart("Idle GPU-hours, test", "h", &bars, &[("idle", BAR)]).unwrap();
        let (_, pixels) = pixels_of(&png, BAR);
        let x0 = pixels.iter().map(|p| p.0).min().unwrap();
        // One bar per row, top to bottom, each a readable height.
        let runs = runs_in_column(&png, BAR, x0 + 2);
        assert_eq!(runs.len(), TOP_NODES + 1, "{runs:?}");
        for (top, bottom) in &runs {
            assert!(bottom - top >= 12, "bar {top}..{bottom} too thin: {runs:?}");
            let mid = (top + bottom) / 2;
            assert!(
                dark_left_of(&png, x0, mid - 4, mid + 4) > 10,
                "bar at {mid} has no label"
            );
        }
        // Lengths follow the values: the first (500) longest, the others' (485) shortest.
        let length = |(top, bottom): (u32, u32)| {
            let mid = (top + bottom) / 2;
            pixels.iter().filter(|p| p.1 == mid).count()
        };
        let lengths: Vec<usize> = runs.iter().map(|r| length(*r)).collect();
        assert!(lengths.windows(2).all(|w| w[0] >= w[1]), "{lengths:?}");
        let expect = 485.0 / 500.0;
        let got = lengths[TOP_NODES] as f64 / lengths[0] as f64;
        assert!((got - expect).abs() < 0.01, "{lengths:?}");
    }
}
