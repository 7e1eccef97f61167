//! The pictures of a report, drawn with `plotters` into PNG files, and
//! `index.html`, one self-contained page with the tables and the images
//! inline.
//!
//! Text is rendered with the DejaVu Sans font shipped in `assets/` (its
//! licence is next to it), so plots look the same on every machine and need
//! no system fonts.

use crate::features::Embedded;
use crate::report::{fraction_label, EvalReport};
use crate::{Error, Result};
use plotters::coord::Shift;
use plotters::prelude::*;
use std::path::{Path, PathBuf};
use std::sync::Once;

const FONT: &str = "sans-serif";
const W: u32 = 900;
const H: u32 = 560;

fn register_font() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // the bytes are compiled in and known to parse (tested)
        let _ = plotters::style::register_font(FONT, FontStyle::Normal, include_bytes!("../assets/DejaVuSans.ttf"));
    });
}

fn draw_err<E: std::fmt::Display>(what: &str) -> impl Fn(E) -> Error + '_ {
    move |e| Error::Invalid(format!("drawing {what}: {e}"))
}

/// Draws with `f` on a `W`×`H` white canvas and returns the PNG bytes.
fn render(what: &str, f: impl FnOnce(&DrawingArea<BitMapBackend<'_>, Shift>) -> Result<()>) -> Result<Vec<u8>> {
    register_font();
    let mut buf = vec![255u8; (W * H * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut buf, (W, H)).into_drawing_area();
        root.fill(&WHITE).map_err(draw_err(what))?;
        f(&root)?;
        root.present().map_err(draw_err(what))?;
    }
    let img =
        image::RgbImage::from_raw(W, H, buf).ok_or_else(|| Error::Invalid(format!("drawing {what}: bad buffer")))?;
    let mut png = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .map_err(draw_err(what))?;
    Ok(png)
}

/// A line chart (900×560 PNG) of named `(x, y)` series; `log_x` draws x on a log scale.
///
/// # Errors
/// No points, or drawing failed.
pub fn line_chart(
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[(String, Vec<(f64, f64)>)],
    log_x: bool,
) -> Result<Vec<u8>> {
    line_chart_spanning(title, x_label, y_label, series, log_x, None)
}

/// [`line_chart`] whose y axis spans at least `y_span` (`(0, 1)` for
/// fractions of an ideal, so that a flat line near 0.5 is drawn as such).
///
/// # Errors
/// No points, or drawing failed.
pub fn line_chart_spanning(
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[(String, Vec<(f64, f64)>)],
    log_x: bool,
    y_span: Option<(f64, f64)>,
) -> Result<Vec<u8>> {
    let pts = series.iter().flat_map(|(_, s)| s.iter());
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in pts {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    if x0 > x1 {
        return Err(Error::Invalid(format!("drawing {title}: no data")));
    }
    if let Some((lo, hi)) = y_span {
        (y0, y1) = (y0.min(lo), y1.max(hi));
    }
    let pad = ((y1 - y0) * 0.08).max(1e-3);
    let (y0, y1) = (y0 - pad, y1 + pad);
    let (x0, x1) = if log_x {
        (x0 / 1.5, x1 * 1.5)
    } else if x1 > x0 {
        (x0, x1)
    } else {
        (x0 - 1.0, x1 + 1.0)
    };
    render(title, |root| {
        let mut b = ChartBuilder::on(root);
        b.caption(title, (FONT, 26))
            .margin(18)
            .x_label_area_size(48)
            .y_label_area_size(64);
        if log_x {
            let mut chart = b
                .build_cartesian_2d((x0..x1).log_scale(), y0..y1)
                .map_err(draw_err(title))?;
            chart
                .configure_mesh()
                .x_desc(x_label)
                .y_desc(y_label)
                .label_style((FONT, 16))
                .axis_desc_style((FONT, 18))
                .x_label_formatter(&|v| format!("{}%", (v * 1000.0).round() / 10.0))
                .draw()
                .map_err(draw_err(title))?;
            for (i, (name, s)) in series.iter().enumerate() {
                let c = Palette99::pick(i).to_rgba();
                chart
                    .draw_series(LineSeries::new(s.iter().copied(), c.stroke_width(3)))
                    .map_err(draw_err(title))?
                    .label(name.as_str())
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(3)));
                chart
                    .draw_series(s.iter().map(|&p| Circle::new(p, 5, c.filled())))
                    .map_err(draw_err(title))?;
            }
            chart
                .configure_series_labels()
                .label_font((FONT, 15))
                .background_style(WHITE.mix(0.85))
                .border_style(BLACK)
                .position(SeriesLabelPosition::LowerRight)
                .draw()
                .map_err(draw_err(title))?;
        } else {
            let mut chart = b.build_cartesian_2d(x0..x1, y0..y1).map_err(draw_err(title))?;
            chart
                .configure_mesh()
                .x_desc(x_label)
                .y_desc(y_label)
                .label_style((FONT, 16))
                .axis_desc_style((FONT, 18))
                .draw()
                .map_err(draw_err(title))?;
            for (i, (name, s)) in series.iter().enumerate() {
                let c = Palette99::pick(i).to_rgba();
                chart
                    .draw_series(LineSeries::new(s.iter().copied(), c.stroke_width(2)))
                    .map_err(draw_err(title))?
                    .label(name.as_str())
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2)));
                if s.len() < 60 {
                    chart
                        .draw_series(s.iter().map(|&p| Circle::new(p, 4, c.filled())))
                        .map_err(draw_err(title))?;
                }
            }
            if series.len() > 1 {
                chart
                    .configure_series_labels()
                    .label_font((FONT, 15))
                    .background_style(WHITE.mix(0.85))
                    .border_style(BLACK)
                    .draw()
                    .map_err(draw_err(title))?;
            }
        }
        Ok(())
    })
}

/// The training loss (raw and smoothed) against the step, from `metrics.jsonl` records.
///
/// # Errors
/// No loss records.
pub fn loss_curve(records: &[serde_json::Value]) -> Result<Vec<u8>> {
    let pts: Vec<(f64, f64)> = records
        .iter()
        .filter(|r| r.get("event").is_none())
        .filter_map(|r| Some((r.get("step")?.as_f64()?, r.get("loss")?.as_f64()?)))
        .filter(|(_, l)| l.is_finite())
        .collect();
    let window = (pts.len() / 50).max(1);
    let smooth: Vec<(f64, f64)> = pts
        .iter()
        .enumerate()
        .map(|(i, &(x, _))| {
            let lo = i.saturating_sub(window - 1);
            let m = pts[lo..=i].iter().map(|p| p.1).sum::<f64>() / (i - lo + 1) as f64;
            (x, m)
        })
        .collect();
    let mut series = vec![("loss".to_string(), pts)];
    if window > 1 {
        series.push((format!("mean of last {window} steps"), smooth));
    }
    line_chart("Training loss", "step", "loss", &series, false)
}

/// Online kNN accuracy (%) against the epoch, from the `knn` events of `metrics.jsonl`.
/// `None` when the run logged none.
///
/// # Errors
/// Drawing failed.
pub fn knn_curve(records: &[serde_json::Value]) -> Result<Option<Vec<u8>>> {
    let pts: Vec<(f64, f64)> = records
        .iter()
        .filter(|r| r.get("event").and_then(|e| e.as_str()) == Some("knn"))
        .filter_map(|r| Some((r.get("epoch")?.as_f64()?, r.get("knn_accuracy")?.as_f64()? * 100.0)))
        .collect();
    if pts.is_empty() {
        return Ok(None);
    }
    line_chart(
        "Online kNN accuracy (held-out)",
        "epoch",
        "accuracy (%)",
        &[("kNN".to_string(), pts)],
        false,
    )
    .map(Some)
}

/// The collapse indicators against the epoch, from the `spread` events of
/// `metrics.jsonl`, both scaled so that 1 is the ideal: the embedding std
/// times `√d` (1 = spread evenly over the sphere, 0 = collapsed to a point)
/// and the effective rank over `d`. `None` when the run logged none.
///
/// # Errors
/// Drawing failed.
pub fn spread_curve(records: &[serde_json::Value]) -> Result<Option<Vec<u8>>> {
    let events: Vec<&serde_json::Value> = records
        .iter()
        .filter(|r| r.get("event").and_then(|e| e.as_str()) == Some("spread"))
        .collect();
    let series = |f: &dyn Fn(&serde_json::Value) -> Option<f64>| -> Vec<(f64, f64)> {
        events
            .iter()
            .filter_map(|r| Some((r.get("epoch")?.as_f64()?, f(r)?)))
            .filter(|(_, y)| y.is_finite())
            .collect()
    };
    let std = series(&|r| Some(r.get("embedding_std")?.as_f64()? / r.get("uniform_std")?.as_f64()?));
    let rank = series(&|r| Some(r.get("effective_rank")?.as_f64()? / r.get("dim")?.as_f64()?));
    if std.is_empty() && rank.is_empty() {
        return Ok(None);
    }
    line_chart_spanning(
        "Collapse indicators (held-out embeddings; 0 = collapsed)",
        "epoch",
        "fraction of the ideal",
        &[
            ("std of normalised embeddings × √d".to_string(), std),
            ("effective rank / d".to_string(), rank),
        ],
        false,
        Some((0.0, 1.0)),
    )
    .map(Some)
}

/// Accuracy (%) against the fraction of labels, one line per features × protocol.
///
/// # Errors
/// An empty report.
pub fn label_efficiency(report: &EvalReport) -> Result<Vec<u8>> {
    let mut series: Vec<(String, Vec<(f64, f64)>)> = Vec::new();
    for r in &report.records {
        let name = format!("{} · {}", r.features, r.protocol);
        let pos = match series.iter().position(|(n, _)| *n == name) {
            Some(p) => p,
            None => {
                series.push((name, Vec::new()));
                series.len() - 1
            }
        };
        series[pos].1.push((r.labels, r.accuracy * 100.0));
    }
    for (_, s) in &mut series {
        s.sort_by(|a, b| a.0.total_cmp(&b.0));
    }
    line_chart(
        &format!("Label efficiency: {} on {}", report.method, report.dataset),
        "labelled training images (fraction)",
        "test accuracy (%)",
        &series,
        true,
    )
}

/// The top two principal directions of the rows of `x` (`n × d`), by power
/// iteration with deflation on the covariance; returns the centred 2-D projection.
pub fn pca_2d(x: &[f32], n: usize, d: usize) -> Vec<(f64, f64)> {
    let mut mean = vec![0f64; d];
    for row in x.chunks(d) {
        for (m, &v) in mean.iter_mut().zip(row) {
            *m += f64::from(v) / n as f64;
        }
    }
    let mut cov = vec![0f64; d * d];
    for row in x.chunks(d) {
        let c: Vec<f64> = row.iter().zip(&mean).map(|(&v, m)| f64::from(v) - m).collect();
        for i in 0..d {
            for j in 0..d {
                cov[i * d + j] += c[i] * c[j];
            }
        }
    }
    let mut dirs: Vec<Vec<f64>> = Vec::new();
    for k in 0..2 {
        let mut v: Vec<f64> = (0..d).map(|i| 1.0 + ((i * 7 + k * 3) % 11) as f64 / 11.0).collect();
        for _ in 0..300 {
            let mut w = vec![0f64; d];
            for i in 0..d {
                w[i] = (0..d).map(|j| cov[i * d + j] * v[j]).sum();
            }
            for u in &dirs {
                let dot: f64 = w.iter().zip(u).map(|(a, b)| a * b).sum();
                for (wi, ui) in w.iter_mut().zip(u) {
                    *wi -= dot * ui;
                }
            }
            let norm = w.iter().map(|a| a * a).sum::<f64>().sqrt();
            if norm == 0.0 {
                break;
            }
            v = w.into_iter().map(|a| a / norm).collect();
        }
        dirs.push(v);
    }
    x.chunks(d)
        .map(|row| {
            let c: Vec<f64> = row.iter().zip(&mean).map(|(&v, m)| f64::from(v) - m).collect();
            let p = |u: &[f64]| c.iter().zip(u).map(|(a, b)| a * b).sum::<f64>();
            (p(&dirs[0]), p(&dirs[1]))
        })
        .collect()
}

/// A PCA scatter of (at most `max_points`, evenly spaced) test features, coloured by class.
///
/// # Errors
/// No features.
pub fn pca_scatter(features: &Embedded, class_names: &[String], max_points: usize) -> Result<Vec<u8>> {
    let step = features.len().div_ceil(max_points.max(1)).max(1);
    let idx: Vec<usize> = (0..features.len()).step_by(step).collect();
    let sub = features.select(&idx);
    let pts = pca_2d(&sub.features, sub.len(), sub.dim);
    let classes = sub.num_classes();
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in &pts {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    if pts.is_empty() || x0 >= x1 || y0 >= y1 {
        return Err(Error::Invalid("drawing PCA: features have no spread".into()));
    }
    let title = "Test features, first two principal components";
    render(title, |root| {
        let mut chart = ChartBuilder::on(root)
            .caption(title, (FONT, 24))
            .margin(18)
            .x_label_area_size(40)
            .y_label_area_size(56)
            .build_cartesian_2d(x0..x1 + (x1 - x0) * 0.35, y0..y1)
            .map_err(draw_err(title))?;
        chart
            .configure_mesh()
            .x_desc("PC 1")
            .y_desc("PC 2")
            .label_style((FONT, 14))
            .axis_desc_style((FONT, 16))
            .draw()
            .map_err(draw_err(title))?;
        for c in 0..classes {
            let colour = Palette99::pick(c).to_rgba();
            let name = class_names.get(c).cloned().unwrap_or_else(|| format!("class {c}"));
            chart
                .draw_series(
                    pts.iter()
                        .zip(&sub.labels)
                        .filter(|(_, &l)| l as usize == c)
                        .map(|(&p, _)| Circle::new(p, 3, colour.mix(0.7).filled())),
                )
                .map_err(draw_err(title))?
                .label(name)
                .legend(move |(x, y)| Circle::new((x + 8, y), 5, colour.filled()));
        }
        chart
            .configure_series_labels()
            .label_font((FONT, 14))
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .position(SeriesLabelPosition::UpperRight)
            .draw()
            .map_err(draw_err(title))?;
        Ok(())
    })
}

/// What a report page can show besides the accuracy table.
#[derive(Debug, Clone, Default)]
pub struct RunFigures<'a> {
    /// The run's `metrics.jsonl` (loss and kNN curves).
    pub metrics: Option<&'a Path>,
    /// Pretrained test features (PCA scatter).
    pub test_features: Option<&'a Embedded>,
    /// Class names by label.
    pub class_names: &'a [String],
    /// More pictures of the paradigm: (file name, caption, PNG bytes), written and shown after the plots.
    pub extra_images: Vec<(String, String, Vec<u8>)>,
    /// An HTML fragment shown above the accuracy table (e.g. a likelihood table).
    pub intro_html: String,
}

fn html_escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

/// Writes the PNG plots (`loss.png`, `knn.png`, `label_efficiency.png`,
/// `pca.png`, those that have data) and `index.html` into `dir`, each
/// atomically; returns the files written.
///
/// # Errors
/// Unreadable metrics, drawing or I/O failures.
pub fn write_report_page(dir: &Path, report: &EvalReport, figures: &RunFigures<'_>) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).map_err(|e| Error::Core(pretext_core::Error::io(dir, e)))?;
    let mut images: Vec<(&str, &str, Vec<u8>)> = Vec::new();
    for (name, caption, png) in &figures.extra_images {
        if name.contains('/') || !name.ends_with(".png") {
            return Err(Error::Invalid(format!(
                "report image name {name:?}: must be a plain .png file name"
            )));
        }
        images.push((name, caption, png.clone()));
    }
    if !report.records.is_empty() {
        images.push(("label_efficiency.png", "Label efficiency", label_efficiency(report)?));
    }
    if let Some(path) = figures.metrics.filter(|p| p.exists()) {
        let records = pretext_core::run::read_metrics(path)?;
        if records.iter().any(|r| r.get("loss").is_some()) {
            images.push(("loss.png", "Training loss", loss_curve(&records)?));
        }
        if let Some(png) = knn_curve(&records)? {
            images.push(("knn.png", "Online kNN accuracy", png));
        }
        if let Some(png) = spread_curve(&records)? {
            images.push(("spread.png", "Embedding spread (collapse indicators)", png));
        }
    }
    if let Some(f) = figures.test_features {
        images.push((
            "pca.png",
            "Test features (PCA)",
            pca_scatter(f, figures.class_names, 2000)?,
        ));
    }
    let mut written = Vec::new();
    for (name, _, png) in &images {
        let p = dir.join(name);
        pretext_core::run::write_atomic(&p, png)?;
        written.push(p);
    }
    let html = index_html(report, &images, &figures.intro_html);
    let p = dir.join("index.html");
    pretext_core::run::write_atomic(&p, html.as_bytes())?;
    written.push(p);
    Ok(written)
}

fn index_html(report: &EvalReport, images: &[(&str, &str, Vec<u8>)], intro_html: &str) -> String {
    use base64::Engine;
    let mut fracs: Vec<f64> = report.records.iter().map(|r| r.labels).collect();
    fracs.sort_by(f64::total_cmp);
    fracs.dedup();
    let mut rows: Vec<(String, String)> = Vec::new();
    for r in &report.records {
        let key = (r.features.clone(), r.protocol.clone());
        if !rows.contains(&key) {
            rows.push(key);
        }
    }
    let title = format!(
        "pretext · {} ({}) on {}",
        html_escape(&report.method),
        html_escape(&report.paradigm),
        html_escape(&report.dataset)
    );
    let mut s = format!(
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{title}</title>\n<style>\
body{{font-family:system-ui,sans-serif;max-width:1000px;margin:2em auto;color:#222}}\
table{{border-collapse:collapse;margin:1em 0}}td,th{{border:1px solid #ccc;padding:.3em .8em;text-align:right}}\
td:first-child,td:nth-child(2),th{{text-align:left}}img{{max-width:100%;border:1px solid #eee}}\
.best{{font-weight:bold}}</style></head><body>\n<h1>{title}</h1>\n{intro_html}\n\
<p>Test accuracy (%) by fraction of training labels; features: <b>pretrained</b> (this run), \
<b>random-init</b> (same architecture, untrained), <b>raw</b> (input pixels); protocols: linear probe, \
weighted kNN, fine-tuning (from random-init = supervised from scratch). Machine-readable: \
<a href=\"eval.json\">eval.json</a>.</p>\n<table><tr><th>features</th><th>protocol</th>"
    );
    for f in &fracs {
        s.push_str(&format!("<th>{}</th>", fraction_label(*f)));
    }
    s.push_str("</tr>\n");
    for (feat, proto) in &rows {
        s.push_str(&format!(
            "<tr><td>{}</td><td>{}</td>",
            html_escape(feat),
            html_escape(proto)
        ));
        for f in &fracs {
            let best = report
                .records
                .iter()
                .filter(|r| r.protocol == *proto && r.labels == *f)
                .map(|r| r.accuracy)
                .fold(f64::MIN, f64::max);
            match report
                .records
                .iter()
                .find(|r| r.features == *feat && r.protocol == *proto && r.labels == *f)
            {
                Some(r) if r.accuracy == best => {
                    s.push_str(&format!("<td class=\"best\">{:.2}</td>", r.accuracy * 100.0))
                }
                Some(r) => s.push_str(&format!("<td>{:.2}</td>", r.accuracy * 100.0)),
                None => s.push_str("<td>–</td>"),
            }
        }
        s.push_str("</tr>\n");
    }
    s.push_str("</table>\n<p>Bold: best features for that protocol and label fraction.</p>\n");
    for (name, caption, png) in images {
        s.push_str(&format!(
            "<h2>{caption}</h2>\n<img alt=\"{caption}\" title=\"{name}\" src=\"data:image/png;base64,{}\">\n",
            base64::engine::general_purpose::STANDARD.encode(png)
        ));
    }
    s.push_str("</body></html>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::EvalRecord;

    fn decode(png: &[u8]) -> image::RgbImage {
        image::load_from_memory(png).expect("a PNG").to_rgb8()
    }

    /// Fraction of pixels that are not white: something was drawn.
    fn ink(img: &image::RgbImage) -> f64 {
        img.pixels().filter(|p| p.0 != [255, 255, 255]).count() as f64 / (img.width() * img.height()) as f64
    }

    #[test]
    fn the_shipped_font_parses() {
        assert!(ab_glyph::FontRef::try_from_slice(include_bytes!("../assets/DejaVuSans.ttf")).is_ok());
    }

    #[test]
    fn pca_finds_the_directions_of_largest_variance() {
        // a grid: spread 2 along (1,1,0)/√2 and 0.3 along (0,0,1), uncorrelated, nothing along (1,-1,0)
        let mut x = Vec::new();
        let mut ab = Vec::new();
        for i in -5..=5 {
            for j in -2..=2 {
                let (a, b) = (i as f32 * 2.0, j as f32 * 0.3);
                x.extend_from_slice(&[a / 2f32.sqrt() + 3.0, a / 2f32.sqrt() - 1.0, b + 5.0]);
                ab.push((f64::from(a), f64::from(b)));
            }
        }
        let p = pca_2d(&x, ab.len(), 3);
        for (&(u, v), &(a, b)) in p.iter().zip(&ab) {
            // up to sign
            assert!((u.abs() - a.abs()).abs() < 1e-3, "pc1 {u} vs {a}");
            assert!((v.abs() - b.abs()).abs() < 1e-3, "pc2 {v} vs {b}");
        }
    }

    #[test]
    fn charts_are_pngs_with_content() {
        let metrics: Vec<serde_json::Value> = (1..=120)
            .map(|s| serde_json::json!({"step": s, "loss": 5.0 - (s as f64).ln() * 0.3}))
            .chain(
                (1..=3).map(|e| serde_json::json!({"event": "knn", "epoch": e, "knn_accuracy": 0.7 + 0.03 * e as f64})),
            )
            .collect();
        let loss = decode(&loss_curve(&metrics).expect("loss"));
        assert_eq!((loss.width(), loss.height()), (W, H));
        assert!(ink(&loss) > 0.01, "loss curve is blank");
        let knn = decode(&knn_curve(&metrics).expect("knn").expect("has kNN"));
        assert!(ink(&knn) > 0.01);
        assert!(knn_curve(&metrics[..5]).expect("none").is_none());
        let spread: Vec<serde_json::Value> = (1..=3)
            .map(|e| {
                serde_json::json!({"event": "spread", "epoch": e, "embedding_std": 0.02 * e as f64,
                    "uniform_std": 0.125, "effective_rank": 10.0 * e as f64, "dim": 64})
            })
            .collect();
        let img = decode(&spread_curve(&spread).expect("spread").expect("has spread"));
        assert!(ink(&img) > 0.01);
        assert!(spread_curve(&metrics).expect("none").is_none());

        let rec = |features: &str, protocol: &str, labels: f64, accuracy: f64| EvalRecord {
            features: features.into(),
            protocol: protocol.into(),
            labels,
            accuracy,
            n_train: 10,
            n_test: 10,
            l2: None,
        };
        let report = EvalReport {
            paradigm: "contrastive".into(),
            method: "simclr".into(),
            dataset: "toy <set>".into(),
            records: vec![
                rec("pretrained", "linear", 0.01, 0.7),
                rec("pretrained", "linear", 1.0, 0.9),
                rec("raw", "linear", 0.01, 0.6),
                rec("raw", "linear", 1.0, 0.8),
            ],
            data: None,
        };
        assert!(ink(&decode(&label_efficiency(&report).expect("curve"))) > 0.01);

        let feats = Embedded::new(
            (0..300).map(|i| ((i * 37) % 101) as f32 / 10.0).collect(),
            3,
            (0..100).map(|i| (i % 4) as u32).collect(),
        )
        .expect("features");
        let dir = tempfile::tempdir().expect("tmp");
        let mpath = dir.path().join("metrics.jsonl");
        let text: String = metrics.iter().map(|m| format!("{m}\n")).collect();
        std::fs::write(&mpath, text).expect("write");
        let written = write_report_page(
            dir.path(),
            &report,
            &RunFigures {
                metrics: Some(&mpath),
                test_features: Some(&feats),
                class_names: &["a".into(), "b".into()],
                ..RunFigures::default()
            },
        )
        .expect("page");
        assert_eq!(written.len(), 5);
        let html = std::fs::read_to_string(dir.path().join("index.html")).expect("html");
        assert_eq!(html.matches("data:image/png;base64,").count(), 4);
        assert!(html.contains("toy &lt;set&gt;"), "names are escaped");
        assert!(html.contains("<td class=\"best\">90.00</td>"), "{html}");
        for f in ["pca.png", "loss.png", "knn.png", "label_efficiency.png"] {
            decode(&std::fs::read(dir.path().join(f)).expect("png"));
        }
    }
}
