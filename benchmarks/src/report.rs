//! Shared report helpers: medians with ranges, UTC time stamps, CSV escaping and a PNG bar
//! chart (plotters, bitmap backend). In: numbers per target. Out: text and files.

use anyhow::{Context, Result};
use std::path::Path;

/// Median, minimum and maximum of `values` (the upper median for an even count); `None` when
/// empty.
pub fn median_min_max(values: &[f64]) -> Option<(f64, f64, f64)> {
    if values.is_empty() {
        return None;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    Some((median(&sorted), sorted[0], sorted[sorted.len() - 1]))
}

/// The median (the mean of the two middle values for an even count; 0 for none).
pub fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let m = sorted.len() / 2;
    match sorted.len() {
        0 => 0.0,
        n if n % 2 == 1 => sorted[m],
        _ => (sorted[m - 1] + sorted[m]) / 2.0,
    }
}

/// `YYYY-MM-DDTHH:MM:SSZ` for now.
pub fn utc_now() -> String {
    let seconds = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let days = seconds.div_euclid(86_400);
    let second_of_day = seconds.rem_euclid(86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let mp = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        second_of_day / 3600,
        second_of_day / 60 % 60,
        second_of_day % 60
    )
}

/// Quotes a CSV field when it needs it.
pub fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

/// Fonts tried for chart text, in order (Debian: fonts-dejavu-core).
const FONT_PATHS: [&str; 3] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/usr/share/fonts/truetype/freefont/FreeSans.ttf",
];

fn register_font_once() -> Result<()> {
    static REGISTERED: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    REGISTERED
        .get_or_init(|| {
            let bytes = FONT_PATHS
                .iter()
                .find_map(|p| std::fs::read(p).ok())
                .ok_or_else(|| {
                    format!(
                        "no font for chart text (looked for {}; Debian: fonts-dejavu-core)",
                        FONT_PATHS.join(", ")
                    )
                })?;
            let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
            plotters::style::register_font("sans-serif", plotters::style::FontStyle::Normal, bytes)
                .map_err(|_| "font could not be loaded".to_string())
        })
        .clone()
        .map_err(anyhow::Error::msg)
}

/// One bar: label, median, min, max.
pub struct Bar {
    pub label: String,
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

/// Writes a PNG bar chart of medians with min–max error bars.
pub fn bar_chart_png(path: &Path, title: &str, y_label: &str, bars: &[Bar]) -> Result<()> {
    use plotters::prelude::*;
    register_font_once()?;
    if bars.is_empty() {
        return Ok(());
    }
    // Log scale: the targets differ by orders of magnitude.
    let y_max = bars
        .iter()
        .map(|b| b.max.max(b.median))
        .fold(0.0f64, f64::max)
        .max(1e-6)
        * 3.0;
    let y_min = bars
        .iter()
        .map(|b| b.min.min(b.median))
        .fold(f64::INFINITY, f64::min)
        .max(1e-6)
        / 3.0;
    let root = BitMapBackend::new(path, (200 + 130 * bars.len() as u32, 520)).into_drawing_area();
    let err = |e: &dyn std::fmt::Display| anyhow::anyhow!("chart: {e}");
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let labels: Vec<String> = bars.iter().map(|b| b.label.clone()).collect();
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(80)
        .build_cartesian_2d(
            (0..bars.len() - 1).into_segmented(),
            (y_min..y_max).log_scale(),
        )
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .y_desc(format!("{y_label} (log scale)"))
        .x_labels(bars.len())
        .x_label_formatter(&|v| match v {
            SegmentValue::CenterOf(i) | SegmentValue::Exact(i) => {
                labels.get(*i).cloned().unwrap_or_default()
            }
            SegmentValue::Last => String::new(),
        })
        .y_label_formatter(&|v| format!("{v:.0}"))
        .label_style(("sans-serif", 14))
        .draw()
        .map_err(|e| err(&e))?;
    chart
        .draw_series(bars.iter().enumerate().map(|(i, b)| {
            let mut bar = Rectangle::new(
                [
                    (SegmentValue::Exact(i), y_min),
                    (SegmentValue::Exact(i + 1), b.median.max(y_min)),
                ],
                RGBColor(70, 110, 180).filled(),
            );
            bar.set_margin(0, 0, 18, 18);
            bar
        }))
        .map_err(|e| err(&e))?;
    chart
        .draw_series(bars.iter().enumerate().map(|(i, b)| {
            ErrorBar::new_vertical(
                SegmentValue::CenterOf(i),
                b.min,
                b.median,
                b.max,
                BLACK.stroke_width(2),
                12,
            )
        }))
        .map_err(|e| err(&e))?;
    chart
        .draw_series(bars.iter().enumerate().map(|(i, b)| {
            Text::new(
                format!("{:.0}", b.median),
                (SegmentValue::CenterOf(i), b.max.max(b.median) * 1.25),
                ("sans-serif", 14),
            )
        }))
        .map_err(|e| err(&e))?;
    root.present()
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_and_ranges() {
        assert_eq!(median_min_max(&[3.0, 1.0, 2.0]), Some((2.0, 1.0, 3.0)));
        assert_eq!(median_min_max(&[]), None);
        assert_eq!(median_min_max(&[50.0, 57.0]), Some((53.5, 50.0, 57.0)));
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), 2.5);
        assert_eq!(csv_field("a,b"), "\"a,b\"");
        assert_eq!(utc_now().len(), 20);
    }
}
