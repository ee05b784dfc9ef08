//! The charts, drawn with plotters into PNG files: one line chart per training metric,
//! overlaid score histograms, and gold and proxy scores against KL.

use std::path::Path;
use std::sync::Once;

use plotters::coord::Shift;
use plotters::prelude::*;

use crate::canvas::{self, Png};
use crate::{Error, Result};

/// One training-curve chart's size in pixels (small: several sit side by side on a page).
pub const SMALL: (u32, u32) = (384, 256);
/// The gold/proxy chart's size.
pub const WIDE: (u32, u32) = (760, 440);

/// The family the embedded font is registered under.
const FONT: &str = "sans-serif";

/// Colours: the baseline / first series in blue, the policy / last in orange (a pairing that
/// stays apart for the common colour-vision deficiencies).
const BLUE: RGBColor = RGBColor(31, 119, 180);
const ORANGE: RGBColor = RGBColor(230, 120, 20);
const GREY: RGBColor = RGBColor(90, 90, 90);

/// Registers the embedded DejaVu Sans with plotters' ab_glyph fonts, once per process, for
/// the text sizes its layout needs ([`Png`] draws the glyphs): bitmap text must not depend on
/// the machine having fonts installed.
fn register_font() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        if plotters::style::register_font(FONT, FontStyle::Normal, canvas::font_bytes()).is_err() {
            // The bytes are a fixed, valid TTF; this cannot fail short of a broken build.
            tracing::error!("the embedded DejaVu Sans did not load; charts will lack text");
        }
    });
}

fn font(size: u32) -> FontDesc<'static> {
    (FONT, size).into_font()
}

fn plot_err(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::Plot {
        path: path.to_path_buf(),
        message: e.to_string(),
    }
}

/// A number for a label or table cell: plain decimals in the usual range, scientific
/// notation for learning rates and large counts.
pub fn tick(v: f64) -> String {
    let a = v.abs();
    if a == 0.0 {
        return "0".into();
    }
    if !(1e-2..1e5).contains(&a) {
        return format!("{v:.1e}");
    }
    trim(format!("{v:.3}"))
}

fn trim(s: String) -> String {
    if !s.contains('.') {
        return s;
    }
    let t = s.trim_end_matches('0').trim_end_matches('.');
    if t == "-0" {
        "0".into()
    } else {
        t.into()
    }
}

/// Axis labels for `range` with about `n` ticks: as many digits as the tick spacing needs,
/// so neighbouring ticks never print alike (1.05e-5 and 1.1e-5, not 1.1e-5 twice).
fn axis(range: &std::ops::Range<f64>, n: usize) -> impl Fn(&f64) -> String {
    let step = (range.end - range.start) / n.max(1) as f64;
    let mag = range.start.abs().max(range.end.abs());
    let step_exp = step.log10().floor() as i32;
    let sci = !(1e-2..1e5).contains(&mag);
    let mag_exp = mag.log10().floor() as i32;
    move |&v: &f64| {
        if v.abs() < step * 1e-6 {
            "0".into()
        } else if sci {
            let prec = (mag_exp - step_exp).clamp(1, 4) as usize;
            format!("{v:.prec$e}")
        } else {
            let prec = (-step_exp).clamp(0, 6) as usize;
            trim(format!("{v:.prec$}"))
        }
    }
}

/// `lo..hi` padded by 5% each side, widened around a constant so it still has an extent.
fn padded(lo: f64, hi: f64) -> std::ops::Range<f64> {
    if hi > lo {
        let pad = (hi - lo) * 0.05;
        lo - pad..hi + pad
    } else {
        let pad = if lo == 0.0 { 1.0 } else { lo.abs() * 0.1 };
        lo - pad..hi + pad
    }
}

fn extent(values: impl Iterator<Item = f64>) -> (f64, f64) {
    values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
        (lo.min(v), hi.max(v))
    })
}

fn canvas(path: &Path, size: (u32, u32)) -> DrawingArea<Png<'_>, Shift> {
    register_font();
    let root = Png(BitMapBackend::new(path, size)).into_drawing_area();
    // Filling a fresh in-memory bitmap cannot fail; any real error shows at `present`.
    let _ = root.fill(&WHITE);
    root
}

/// One metric's curve over training steps, with markers where points are few enough to see.
pub fn line_chart(path: &Path, title: &str, points: &[(f64, f64)]) -> Result<()> {
    let root = canvas(path, SMALL);
    let (x0, x1) = extent(points.iter().map(|p| p.0));
    let (y0, y1) = extent(points.iter().map(|p| p.1));
    let (xr, yr) = (padded(x0, x1), padded(y0, y1));
    let (xf, yf) = (axis(&xr, 6), axis(&yr, 6));
    let draw = || -> std::result::Result<(), Box<dyn std::error::Error + '_>> {
        let mut chart = ChartBuilder::on(&root)
            .caption(title, font(15))
            .margin(8)
            .x_label_area_size(34)
            .y_label_area_size(54)
            .build_cartesian_2d(xr.clone(), yr.clone())?;
        chart
            .configure_mesh()
            .light_line_style(RGBColor(242, 242, 242))
            .x_labels(6)
            .y_labels(6)
            .x_label_formatter(&xf)
            .y_label_formatter(&yf)
            .x_desc("step")
            .label_style(font(12))
            .axis_desc_style(font(13))
            .draw()?;
        chart.draw_series(LineSeries::new(
            points.iter().copied(),
            BLUE.stroke_width(2),
        ))?;
        if points.len() <= 40 {
            chart.draw_series(points.iter().map(|&p| Circle::new(p, 3, BLUE.filled())))?;
        }
        root.present()?;
        Ok(())
    };
    draw().map_err(|e| plot_err(path, e))
}

/// Overlaid histograms of score samples on shared bins (e.g. the baseline's and the policy's
/// scores), each series half-transparent so both stay visible where they overlap.
pub fn histogram(path: &Path, title: &str, series: &[(&str, &[f64])]) -> Result<()> {
    let root = canvas(path, SMALL);
    let all = series.iter().flat_map(|(_, v)| v.iter().copied());
    let (lo, hi) = extent(all.clone().filter(|v| v.is_finite()));
    let n = series.iter().map(|(_, v)| v.len()).max().unwrap_or(0);
    // About sqrt(n) bins, within reason; a constant score gets one bin of width 1.
    let bins = ((n as f64).sqrt().ceil() as usize).clamp(5, 30);
    let (lo, hi) = if hi > lo {
        (lo, hi)
    } else {
        (lo - 0.5, lo + 0.5)
    };
    let width = (hi - lo) / bins as f64;
    let counts: Vec<Vec<u32>> = series
        .iter()
        .map(|(_, vals)| {
            let mut c = vec![0u32; bins];
            for v in vals.iter().filter(|v| v.is_finite()) {
                let i = (((v - lo) / width) as usize).min(bins - 1);
                c[i] += 1;
            }
            c
        })
        .collect();
    let top = counts.iter().flatten().copied().max().unwrap_or(1).max(1);
    let xr = padded(lo, hi);
    let xf = axis(&xr, 6);
    let colours = [BLUE, ORANGE, GREY];
    // The legend goes over the emptiest third, so it hides the fewest bars.
    let tallest = |r: std::ops::Range<usize>| {
        counts
            .iter()
            .flat_map(|c| c[r.clone()].iter())
            .max()
            .copied()
            .unwrap_or(0)
    };
    let third = bins / 3;
    let legend_side = [
        (tallest(0..third), SeriesLabelPosition::UpperLeft),
        (tallest(bins - third..bins), SeriesLabelPosition::UpperRight),
        (
            tallest(third..bins - third),
            SeriesLabelPosition::UpperMiddle,
        ),
    ]
    .into_iter()
    .min_by_key(|(t, _)| *t)
    .map_or(SeriesLabelPosition::UpperLeft, |(_, p)| p);
    let draw = || -> std::result::Result<(), Box<dyn std::error::Error + '_>> {
        let mut chart = ChartBuilder::on(&root)
            .caption(title, font(15))
            .margin(8)
            .x_label_area_size(34)
            .y_label_area_size(44)
            .build_cartesian_2d(xr.clone(), 0.0..top as f64 * 1.3)?;
        chart
            .configure_mesh()
            .light_line_style(RGBColor(242, 242, 242))
            .x_labels(6)
            .y_labels(5)
            .x_label_formatter(&xf)
            .y_label_formatter(&|v| format!("{v:.0}"))
            .x_desc("score")
            .y_desc("answers")
            .label_style(font(12))
            .axis_desc_style(font(13))
            .draw()?;
        for (i, ((name, _), c)) in series.iter().zip(&counts).enumerate() {
            let colour = colours[i % colours.len()];
            chart
                .draw_series(c.iter().enumerate().filter(|(_, &k)| k > 0).map(|(b, &k)| {
                    let x = lo + b as f64 * width;
                    Rectangle::new([(x, 0.0), (x + width, k as f64)], colour.mix(0.45).filled())
                }))?
                .label(*name)
                .legend(move |(x, y)| {
                    Rectangle::new([(x, y - 5), (x + 14, y + 5)], colour.mix(0.6).filled())
                });
        }
        chart
            .configure_series_labels()
            .position(legend_side)
            .background_style(WHITE.mix(0.85))
            .border_style(RGBColor(200, 200, 200))
            .label_font(font(12))
            .draw()?;
        root.present()?;
        Ok(())
    };
    draw().map_err(|e| plot_err(path, e))
}

/// Gold and proxy mean scores against KL from the starting policy (Gao et al.'s
/// over-optimisation picture): proxy keeps rising while gold turns over. Points are labelled
/// by PPO step; with many points only some are, so labels do not pile up.
pub fn gold_proxy(path: &Path, rows: &[crate::data::GoldProxy]) -> Result<()> {
    let root = canvas(path, WIDE);
    let (x0, x1) = extent(rows.iter().map(|r| r.kl_k1));
    let (y0, y1) = extent(rows.iter().flat_map(|r| [r.gold, r.proxy]));
    let every = rows.len().div_ceil(12).max(1);
    // Extra room on the right for the last point's label.
    let x_range = {
        let r = padded(x0, x1);
        r.start..r.end + (r.end - r.start) * 0.06
    };
    let yr = padded(y0, y1);
    let (xf, yf) = (axis(&x_range, 10), axis(&yr, 10));
    let draw = || -> std::result::Result<(), Box<dyn std::error::Error + '_>> {
        let mut chart = ChartBuilder::on(&root)
            .caption("gold and proxy score vs KL", font(19))
            .margin(14)
            .x_label_area_size(44)
            .y_label_area_size(66)
            .build_cartesian_2d(x_range.clone(), yr.clone())?;
        chart
            .configure_mesh()
            .light_line_style(RGBColor(242, 242, 242))
            .x_labels(10)
            .y_labels(10)
            .x_label_formatter(&xf)
            .y_label_formatter(&yf)
            .x_desc("KL(policy || start), k1")
            .y_desc("mean score")
            .label_style(font(14))
            .axis_desc_style(font(15))
            .draw()?;
        for (name, colour, get) in [
            (
                "proxy (reward model)",
                BLUE,
                (|r| r.proxy) as fn(&crate::data::GoldProxy) -> f64,
            ),
            ("gold", ORANGE, |r| r.gold),
        ] {
            let pts: Vec<(f64, f64)> = rows.iter().map(|r| (r.kl_k1, get(r))).collect();
            chart
                .draw_series(LineSeries::new(pts.iter().copied(), colour.stroke_width(2)))?
                .label(name)
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 18, y)], colour.stroke_width(3))
                });
            chart.draw_series(pts.iter().map(|&p| Circle::new(p, 4, colour.filled())))?;
        }
        // Step labels beside the higher of each checkpoint's two points, below the curve
        // where it rises to the right (the free side of a rising curve), above where it falls.
        let labelled = rows
            .iter()
            .enumerate()
            .filter(|(i, _)| i % every == 0 || *i + 1 == rows.len());
        chart.draw_series(labelled.map(|(i, r)| {
            let top = |r: &crate::data::GoldProxy| r.gold.max(r.proxy);
            let rising = rows.get(i + 1).is_some_and(|n| top(n) >= top(r));
            let offset = if rising { (7, 3) } else { (5, -17) };
            EmptyElement::at((r.kl_k1, top(r)))
                + Text::new(format!("step {}", r.step), offset, font(12).color(&GREY))
        }))?;
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .background_style(WHITE.mix(0.85))
            .border_style(RGBColor(200, 200, 200))
            .label_font(font(14))
            .draw()?;
        root.present()?;
        Ok(())
    };
    draw().map_err(|e| plot_err(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_short() {
        assert_eq!(tick(0.0), "0");
        assert_eq!(tick(0.5), "0.5");
        assert_eq!(tick(2.0), "2");
        assert_eq!(tick(-1.25), "-1.25");
        assert_eq!(tick(1234.5678), "1234.568");
        assert_eq!(tick(2e-5), "2.0e-5");
        assert_eq!(tick(-0.0001), "-1.0e-4");
    }

    #[test]
    fn axis_labels_differ_between_ticks() {
        let f = axis(&(9e-6..1.1e-5), 6);
        let labels: Vec<String> = (0..=6)
            .map(|i| f(&(9e-6 + i as f64 * 2e-6 / 6.0)))
            .collect();
        let mut unique = labels.clone();
        unique.dedup();
        assert_eq!(unique.len(), labels.len(), "{labels:?}");
        let f = axis(&(0.0..100.0), 6);
        assert_eq!(
            (f(&0.0), f(&20.0), f(&40.0)),
            ("0".into(), "20".into(), "40".into())
        );
        let f = axis(&(0.4..0.6), 6);
        assert_eq!((f(&0.45), f(&0.5)), ("0.45".into(), "0.5".into()));
        let f = axis(&(-1.0..1.0), 6);
        assert_eq!(f(&-1e-17), "0");
    }

    #[test]
    fn padded_range_has_extent() {
        assert_eq!(padded(0.0, 0.0), -1.0..1.0);
        assert_eq!(padded(2.0, 2.0), 1.8..2.2);
        let r = padded(0.0, 10.0);
        assert!(r.start < 0.0 && r.end > 10.0);
    }

    #[test]
    fn embedded_font_draws_text() {
        register_font();
        let (w, h) = (120u32, 40u32);
        let mut buf = vec![255u8; (w * h * 3) as usize];
        {
            let root = Png(BitMapBackend::with_buffer(&mut buf, (w, h))).into_drawing_area();
            root.draw_text("loss 0.5", &font(20).color(&BLACK), (4, 8))
                .unwrap();
            root.present().unwrap();
        }
        // Glyphs of "loss 0.5" at 20 px cover well over a hundred pixels.
        let dark = buf.chunks(3).filter(|p| p[0] < 128).count();
        assert!(dark > 100, "only {dark} dark pixels: no text drawn");
    }

    #[test]
    fn charts_write_pngs() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.png");
        line_chart(&p, "loss", &[(1.0, 2.0), (2.0, 1.0), (3.0, 0.5)]).unwrap();
        line_chart(&dir.path().join("one.png"), "one point", &[(1.0, 2.0)]).unwrap();
        histogram(
            &dir.path().join("h.png"),
            "gold",
            &[("a", &[0.0, 1.0]), ("b", &[1.0])],
        )
        .unwrap();
        histogram(&dir.path().join("c.png"), "const", &[("a", &[3.0, 3.0])]).unwrap();
        for f in ["a.png", "one.png", "h.png", "c.png"] {
            let bytes = std::fs::read(dir.path().join(f)).unwrap();
            assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "{f}");
        }
    }
}
