//! A report's charts as PNG, drawn in-process with plotters' bitmap backend
//! and the bundled DejaVu Sans (`assets/fonts/`, registered through
//! plotters' `ab_glyph` font table): no system fonts, no C libraries, no
//! browser. Each chart is at least [`WIDTH`] pixels wide, with a title that
//! carries the period, and axis labels with units. A chart with nothing to
//! show is left out; a chart that cannot be drawn is logged and left out.

use std::sync::OnceLock;

use chrono::{DateTime, Utc};
use plotters::coord::ranged1d::SegmentValue;
use plotters::prelude::*;

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
        let bars: Vec<(String, Vec<f64>)> = f
            .idle_gpu_hours
            .iter()
            .take(TOP_NODES)
            .map(|(n, h)| (n.clone(), vec![*h as f64]))
            .collect();
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
        let bars: Vec<(String, Vec<f64>)> = errors
            .iter()
            .take(TOP_NODES)
            .map(|(n, e)| (n.clone(), e.iter().map(|v| *v as f64).collect()))
            .collect();
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

/// Horizontal bars per node (the first the longest, at the top), stacked
/// when there are several `kinds`.
pub fn bar_chart(
    caption: &str,
    x_desc: &str,
    bars: &[(String, Vec<f64>)],
    kinds: &[(&str, RGBColor)],
) -> Result<Vec<u8>, String> {
    if !font_ready() {
        return Err("the bundled font cannot be read".into());
    }
    let n = bars.len().max(1) as i32;
    let max = bars
        .iter()
        .map(|(_, v)| v.iter().sum::<f64>())
        .fold(0.0f64, f64::max)
        .max(1.0)
        .ceil();
    let mut buf = vec![255u8; (WIDTH * HEIGHT * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut buf, (WIDTH, HEIGHT)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| e.to_string())?;
        let names: Vec<String> = bars.iter().map(|(n, _)| n.clone()).collect();
        let label_width = names
            .iter()
            .map(|s| s.chars().count())
            .max()
            .unwrap_or(4)
            .clamp(4, 28) as u32
            * 9
            + 16;
        let mut chart = ChartBuilder::on(&root)
            .caption(caption, (FAMILY, 22))
            .margin(16)
            .x_label_area_size(56)
            .y_label_area_size(label_width)
            .build_cartesian_2d(0f64..max * 1.1, (0..n - 1).into_segmented())
            .map_err(|e| e.to_string())?;
        let name_of = |v: &SegmentValue<i32>| match v {
            SegmentValue::CenterOf(i) | SegmentValue::Exact(i) => {
                let idx = (n - 1 - *i) as usize;
                names
                    .get(idx)
                    .map(|s| {
                        if s.chars().count() > 28 {
                            format!("{}…", s.chars().take(27).collect::<String>())
                        } else {
                            s.clone()
                        }
                    })
                    .unwrap_or_default()
            }
            SegmentValue::Last => String::new(),
        };
        chart
            .configure_mesh()
            .y_labels(n as usize)
            .x_labels((max as usize + 1).min(11))
            .y_label_formatter(&name_of)
            .x_label_formatter(&|x: &f64| crate::report::render::fmt_num(*x))
            .x_desc(x_desc)
            .y_desc("Node")
            .label_style((FAMILY, 15))
            .axis_desc_style((FAMILY, 16))
            .disable_y_mesh()
            .light_line_style(RGBColor(0xee, 0xee, 0xee))
            .draw()
            .map_err(|e| e.to_string())?;
        for (k, (label, color)) in kinds.iter().enumerate() {
            let color = *color;
            let rects: Vec<Rectangle<(f64, SegmentValue<i32>)>> = bars
                .iter()
                .enumerate()
                .filter_map(|(rank, (_, values))| {
                    let v = *values.get(k)?;
                    if v <= 0.0 {
                        return None;
                    }
                    let from: f64 = values.iter().take(k).sum();
                    let i = n - 1 - rank as i32;
                    let mut r = Rectangle::new(
                        [
                            (from, SegmentValue::Exact(i)),
                            (from + v, SegmentValue::Exact(i + 1)),
                        ],
                        color.filled(),
                    );
                    r.set_margin(4, 4, 0, 0);
                    Some(r)
                })
                .collect();
            let anno = chart.draw_series(rects).map_err(|e| e.to_string())?;
            if kinds.len() > 1 {
                anno.label(*label).legend(move |(x, y)| {
                    Rectangle::new([(x, y - 6), (x + 14, y + 6)], color.filled())
                });
            }
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
}
