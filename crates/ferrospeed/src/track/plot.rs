//! `plot.png`: a run's (or several runs') `metrics.jsonl` drawn as one picture — loss, learning rate,
//! gradient norm, throughput and peak memory over steps, the runs overlaid in colours named by a legend.
//!
//! Drawn with plotters' bitmap backend into memory and encoded with `png`; text goes through plotters'
//! `ab_glyph` rasteriser with DejaVu Sans embedded in the binary (the `dejavu` crate: the font's own
//! Bitstream Vera / DejaVu licence, free to embed and redistribute; the crate's code is MIT/Apache-2.0).
//! Nothing is looked up on the machine — no fontconfig, no system fonts — so a plot draws the same
//! on a CI box without a display as on a workstation, and the same rows give the same bytes.

use super::{MetricsLines, StepMetrics, TrackError};
use plotters::coord::Shift;
use plotters::prelude::*;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// Width and height of the picture in pixels: five panels and the legend, three by two.
pub const PLOT_SIZE: (u32, u32) = (1500, 900);

/// The font family the panels' text asks plotters for (registered once, from the embedded bytes).
const FONT: &str = "sans-serif";

/// One run as the plot draws it: its name in the legend and its rows in step order.
#[derive(Debug, Clone, PartialEq)]
pub struct RunSeries {
    pub name: String,
    pub rows: Vec<StepMetrics>,
}

impl RunSeries {
    /// The run in `dir`: the rows of its `metrics.jsonl`, named after the directory. Lines that are
    /// not rows are skipped ([`RunSeries::read_noting`] says which); a directory without a single row
    /// is [`TrackError::NoMetrics`], or [`TrackError::CorruptMetrics`] when it has lines but none is a row.
    pub fn read(dir: &Path) -> Result<Self, TrackError> {
        Self::read_noting(dir).map(|(run, _)| run)
    }

    /// [`RunSeries::read`], and a one-line warning naming the lines of `metrics.jsonl` that were
    /// skipped, when there are any.
    pub fn read_noting(dir: &Path) -> Result<(Self, Option<String>), TrackError> {
        let path = dir.join(super::tracker::METRICS_FILE);
        let text = std::fs::read_to_string(&path).map_err(|_| TrackError::NoMetrics { dir: dir.to_path_buf() })?;
        let MetricsLines { mut rows, bad_lines } = MetricsLines::parse(&text);
        if rows.is_empty() {
            return Err(match bad_lines.first() {
                Some(&first) => TrackError::CorruptMetrics { path, lines: bad_lines.len(), first },
                None => TrackError::NoMetrics { dir: dir.to_path_buf() },
            });
        }
        let warning = MetricsLines { rows: Vec::new(), bad_lines }.warning(&path);
        rows.sort_by_key(|m| m.step);
        let name = dir.file_name().map_or_else(|| dir.display().to_string(), |n| n.to_string_lossy().into_owned());
        Ok((Self { name, rows }, warning))
    }
}

/// One panel: its title and the value it reads from a row (NaN where the row has none).
struct Panel {
    title: &'static str,
    value: fn(&StepMetrics) -> f64,
    /// A second series drawn as circles where a row has it (the loss panel: the held-out loss).
    marks: Option<fn(&StepMetrics) -> Option<f64>>,
}

const GIB: f64 = (1u64 << 30) as f64;

/// Peak memory of a row in GiB: the GPU's where it was measured, else the process's resident peak.
fn memory_gib(m: &StepMetrics) -> f64 {
    let gpu = m.extra.get("peak_gpu_mem_bytes").and_then(|v| v.as_u64());
    gpu.unwrap_or(m.peak_mem_bytes) as f64 / GIB
}

const PANELS: [Panel; 5] = [
    Panel { title: "loss (circles: held-out loss)", value: |m| m.loss, marks: Some(|m| m.eval_loss.filter(|e| e.is_finite())) },
    Panel { title: "learning rate", value: |m| m.lr, marks: None },
    Panel { title: "gradient norm (before clipping)", value: |m| m.grad_norm, marks: None },
    Panel { title: "throughput (tokens/s)", value: |m| m.tokens_per_s, marks: None },
    Panel { title: "peak memory (GiB; GPU where measured, else host)", value: memory_gib, marks: None },
];

/// Writes the plot of `runs` to `out` as a PNG of [`PLOT_SIZE`], through a temporary file and a
/// rename, so a reader never sees half a picture.
pub fn plot_runs(runs: &[RunSeries], out: &Path) -> Result<(), TrackError> {
    let bytes = render_png(runs)?;
    let mut tmp = out.as_os_str().to_os_string();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    std::fs::write(&tmp, bytes).map_err(|source| TrackError::Write { path: tmp.clone(), source })?;
    std::fs::rename(&tmp, out).map_err(|source| TrackError::Write { path: out.to_path_buf(), source })
}

/// The PNG file of the plot of `runs`, in memory.
pub fn render_png(runs: &[RunSeries]) -> Result<Vec<u8>, TrackError> {
    let (w, h) = PLOT_SIZE;
    let mut rgb = vec![0u8; w as usize * h as usize * 3];
    draw(runs, &mut rgb).map_err(|message| TrackError::Plot { message })?;
    let mut png_bytes = Vec::new();
    let mut encoder = png::Encoder::new(&mut png_bytes, w, h);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    let encoded = encoder.write_header().and_then(|mut writer| writer.write_image_data(&rgb));
    encoded.map_err(|e| TrackError::Plot { message: format!("encoding the PNG: {e}") })?;
    Ok(png_bytes)
}

fn register_font() -> Result<(), String> {
    static REGISTERED: OnceLock<bool> = OnceLock::new();
    let ok = *REGISTERED.get_or_init(|| plotters::style::register_font(FONT, FontStyle::Normal, dejavu::sans::regular()).is_ok());
    if ok { Ok(()) } else { Err("the embedded DejaVu Sans font did not load".into()) }
}

/// The colour of run `i` (plotters' palette for colour-blind readers, cycled).
fn colour(i: usize) -> RGBColor {
    let (r, g, b) = Palette99::COLORS[i % Palette99::COLORS.len()];
    RGBColor(r, g, b)
}

fn draw(runs: &[RunSeries], rgb: &mut [u8]) -> Result<(), String> {
    register_font()?;
    let root = BitMapBackend::with_buffer(rgb, PLOT_SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let cells = root.split_evenly((2, 3));
    for (cell, panel) in cells.iter().zip(&PANELS) {
        draw_panel(cell, panel, runs).map_err(|e| format!("panel {}: {e}", panel.title))?;
    }
    draw_legend(&cells[5], runs).map_err(|e| format!("legend: {e}"))?;
    root.present().map_err(|e| e.to_string())
}

/// The finite points of `panel` for one run, split where a value is missing (NaN: a diverged or
/// skipped step), so a gap shows as a gap.
fn segments(run: &RunSeries, panel: &Panel) -> Vec<Vec<(f64, f64)>> {
    let mut out = vec![Vec::new()];
    for m in &run.rows {
        let v = (panel.value)(m);
        if v.is_finite() {
            out.last_mut().expect("never empty").push((m.step as f64, v));
        } else if !out.last().expect("never empty").is_empty() {
            out.push(Vec::new());
        }
    }
    out.retain(|s| !s.is_empty());
    out
}

/// `[lo, hi]` widened by a margin, and by a little around a constant.
fn padded(lo: f64, hi: f64) -> (f64, f64) {
    let span = hi - lo;
    if span > 0.0 {
        (lo - span * 0.05, hi + span * 0.05)
    } else {
        let pad = if lo == 0.0 { 1.0 } else { lo.abs() * 0.05 };
        (lo - pad, hi + pad)
    }
}

/// An axis label of `v` on an axis from `lo` to `hi`: as many digits as tell its ticks apart, and
/// short enough for the margin (3.0e-4, 0.25, 12.5k).
fn axis_label(v: f64, lo: f64, hi: f64) -> String {
    let step = ((hi - lo).abs() / 5.0).max(f64::MIN_POSITIVE);
    let mag = lo.abs().max(hi.abs());
    let digits = |x: f64, max: i32| (x.log10().ceil() as i32).clamp(0, max) as usize;
    let trim = |s: String| if s.contains('.') { s.trim_end_matches('0').trim_end_matches('.').to_string() } else { s };
    if v == 0.0 {
        "0".into()
    } else if mag < 0.05 {
        format!("{v:.*e}", digits(mag / step, 4).max(1))
    } else if mag >= 1e7 {
        format!("{}M", trim(format!("{:.*}", digits(1e6 / step, 3), v / 1e6)))
    } else if mag >= 1e4 {
        format!("{}k", trim(format!("{:.*}", digits(1e3 / step, 3), v / 1e3)))
    } else {
        trim(format!("{v:.*}", digits(1.0 / step, 6)))
    }
}

type Area<'a> = DrawingArea<BitMapBackend<'a>, Shift>;

fn draw_panel(area: &Area<'_>, panel: &Panel, runs: &[RunSeries]) -> Result<(), String> {
    let lines: Vec<Vec<Vec<(f64, f64)>>> = runs.iter().map(|r| segments(r, panel)).collect();
    let marks: Vec<Vec<(f64, f64)>> = runs.iter().map(|r| r.rows.iter().filter_map(|m| panel.marks.and_then(|f| f(m)).map(|v| (m.step as f64, v))).collect()).collect();
    let points = lines.iter().flatten().flatten().chain(marks.iter().flatten());
    let (mut x0, mut x1, mut y0, mut y1) = (f64::INFINITY, f64::NEG_INFINITY, f64::INFINITY, f64::NEG_INFINITY);
    for &(x, y) in points {
        (x0, x1, y0, y1) = (x0.min(x), x1.max(x), y0.min(y), y1.max(y));
    }
    if !x0.is_finite() {
        (x0, x1, y0, y1) = (0.0, 1.0, 0.0, 1.0);
    }
    let (x0, x1) = if x1 > x0 { (x0, x1) } else { (x0 - 1.0, x1 + 1.0) };
    let (y0, y1) = padded(y0, y1);
    let mut chart = ChartBuilder::on(area)
        .caption(panel.title, (FONT, 20))
        .margin(12)
        .x_label_area_size(32)
        .y_label_area_size(64)
        .build_cartesian_2d(x0..x1, y0..y1)
        .map_err(|e| e.to_string())?;
    chart
        .configure_mesh()
        .x_desc("step")
        .x_labels(6)
        .y_labels(6)
        .x_label_formatter(&|v| axis_label(*v, x0, x1))
        .y_label_formatter(&|v| axis_label(*v, y0, y1))
        .label_style((FONT, 14))
        .draw()
        .map_err(|e| e.to_string())?;
    for (i, run_lines) in lines.iter().enumerate() {
        let style = colour(i).stroke_width(2);
        for seg in run_lines {
            if seg.len() == 1 {
                chart.draw_series(std::iter::once(Circle::new(seg[0], 3, style.filled()))).map_err(|e| e.to_string())?;
            } else {
                chart.draw_series(LineSeries::new(seg.iter().copied(), style)).map_err(|e| e.to_string())?;
            }
        }
        chart.draw_series(marks[i].iter().map(|&p| Circle::new(p, 5, colour(i).stroke_width(2)))).map_err(|e| e.to_string())?;
    }
    Ok(())
}

fn draw_legend(area: &Area<'_>, runs: &[RunSeries]) -> Result<(), String> {
    let err = |e: DrawingAreaErrorKind<_>| e.to_string();
    area.draw(&Text::new("runs", (30, 30), (FONT, 20).into_font())).map_err(err)?;
    for (i, run) in runs.iter().enumerate() {
        let y = 70 + 30 * i as i32;
        let last = run.rows.last().map_or(f64::NAN, |m| m.loss);
        let label = format!("{} ({} steps, final loss {last:.4})", run.name, run.rows.len());
        area.draw(&PathElement::new(vec![(30, y), (70, y)], colour(i).stroke_width(4))).map_err(err)?;
        area.draw(&Text::new(label, (80, y - 9), (FONT, 16).into_font())).map_err(err)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(step: u64, loss: f64) -> StepMetrics {
        StepMetrics {
            step,
            loss,
            lr: 1e-3,
            grad_norm: 0.5,
            tokens: 512 * step,
            tokens_per_s: 9000.0 + step as f64,
            mfu: None,
            step_ms: 50.0,
            peak_mem_bytes: 1 << 28,
            loss_scale: None,
            eval_loss: None,
            extra: Default::default(),
        }
    }

    fn run(name: &str, losses: &[f64]) -> RunSeries {
        RunSeries { name: name.into(), rows: losses.iter().enumerate().map(|(i, &l)| row(i as u64 + 1, l)).collect() }
    }

    /// The decoded picture: (width, height, RGB pixels).
    fn decode(bytes: &[u8]) -> (u32, u32, Vec<u8>) {
        let mut reader = png::Decoder::new(std::io::Cursor::new(bytes)).read_info().unwrap();
        let mut buf = vec![0; reader.output_buffer_size().unwrap()];
        let info = reader.next_frame(&mut buf).unwrap();
        buf.truncate(info.buffer_size());
        (info.width, info.height, buf)
    }

    #[test]
    fn the_picture_has_its_size_and_follows_the_data() {
        let a = render_png(&[run("a", &[4.0, 3.0, 2.5, 2.0])]).unwrap();
        let (w, h, pixels) = decode(&a);
        assert_eq!((w, h), PLOT_SIZE);
        assert!(pixels.iter().any(|&p| p != 255), "something is drawn on the white background");
        // The same rows give the same bytes; other losses other pixels.
        assert_eq!(render_png(&[run("a", &[4.0, 3.0, 2.5, 2.0])]).unwrap(), a);
        let b = render_png(&[run("a", &[4.0, 3.5, 3.4, 1.0])]).unwrap();
        assert_ne!(decode(&b).2, pixels);
        // A second run overlaid adds its line and its legend entry.
        let both = render_png(&[run("a", &[4.0, 3.0, 2.5, 2.0]), run("b", &[4.0, 3.5, 3.4, 1.0])]).unwrap();
        assert_ne!(decode(&both).2, pixels);
    }

    #[test]
    fn a_run_of_one_step_or_of_nan_still_draws() {
        assert_eq!(decode(&render_png(&[run("one", &[2.0])]).unwrap()).0, PLOT_SIZE.0);
        assert_eq!(decode(&render_png(&[run("nan", &[f64::NAN, f64::NAN])]).unwrap()).0, PLOT_SIZE.0);
    }

    #[test]
    fn held_out_losses_are_drawn_on_the_loss_panel() {
        let mut with = run("a", &[3.0, 2.5, 2.0]);
        with.rows[2].eval_loss = Some(2.9);
        assert_ne!(decode(&render_png(&[run("a", &[3.0, 2.5, 2.0])]).unwrap()).2, decode(&render_png(&[with]).unwrap()).2);
    }

    #[test]
    fn segments_break_at_missing_values() {
        let r = run("a", &[3.0, f64::NAN, 2.0, 1.5]);
        assert_eq!(segments(&r, &PANELS[0]), vec![vec![(1.0, 3.0)], vec![(3.0, 2.0), (4.0, 1.5)]]);
    }

    #[test]
    fn memory_is_the_gpus_where_measured() {
        let mut m = row(1, 1.0);
        m.peak_mem_bytes = 2 << 30;
        assert_eq!(memory_gib(&m), 2.0);
        m.extra.insert("peak_gpu_mem_bytes".into(), serde_json::json!(3u64 << 30));
        assert_eq!(memory_gib(&m), 3.0);
    }

    #[test]
    fn a_directory_without_rows_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let err = RunSeries::read(dir.path()).unwrap_err();
        assert!(matches!(&err, TrackError::NoMetrics { dir: d } if d == dir.path()), "{err}");
        std::fs::write(dir.path().join("metrics.jsonl"), "{\"step\": 1, \"torn").unwrap();
        let err = RunSeries::read(dir.path()).unwrap_err();
        assert!(matches!(&err, TrackError::CorruptMetrics { lines: 1, first: 1, .. }), "{err}");
    }

    #[test]
    fn lines_that_are_not_rows_are_skipped_and_named() {
        let dir = tempfile::tempdir().unwrap();
        let good = |step: u64| serde_json::to_string(&row(step, 3.0 - step as f64 / 10.0)).unwrap();
        let mut missing_loss: serde_json::Value = serde_json::from_str(&good(3)).unwrap();
        missing_loss.as_object_mut().unwrap().remove("loss");
        let text = [good(1), "not json".into(), good(2), String::new(), missing_loss.to_string(), good(4), "{\"step\": 5, \"lo".into()].join("\n");
        std::fs::write(dir.path().join("metrics.jsonl"), text).unwrap();
        let (run, warning) = RunSeries::read_noting(dir.path()).unwrap();
        assert_eq!(run.rows.iter().map(|r| r.step).collect::<Vec<_>>(), [1, 2, 4]);
        let path = dir.path().join("metrics.jsonl");
        assert_eq!(warning.unwrap(), format!("warning: {}: 3 lines are not metrics rows and skipped (lines 2, 5, 7)", path.display()));
        std::fs::write(&path, [good(1), good(2)].join("\n")).unwrap();
        assert_eq!(RunSeries::read_noting(dir.path()).unwrap().1, None);
        let many: Vec<String> = (0..7).map(|_| "x".to_string()).chain([good(1)]).collect();
        std::fs::write(&path, many.join("\n")).unwrap();
        assert!(RunSeries::read_noting(dir.path()).unwrap().1.unwrap().ends_with("7 lines are not metrics rows and skipped (lines 1, 2, 3, 4, 5, …)"));
    }

    #[test]
    fn axis_labels_tell_their_ticks_apart() {
        let cases = [
            (0.0, (0.0, 1.0), "0"),
            (3e-4, (0.0, 1e-3), "3.0e-4"),
            (0.0185, (0.018, 0.019), "1.85e-2"),
            (0.3, (0.0, 1.0), "0.3"),
            (0.25, (0.2, 0.3), "0.25"),
            (4.5, (3.0, 5.5), "4.5"),
            (450.0, (0.0, 1000.0), "450"),
            (12_700.0, (8000.0, 16_000.0), "13k"),
            (12_500.0, (12_000.0, 13_000.0), "12.5k"),
            (2.5e7, (0.0, 5e7), "25M"),
        ];
        for (v, (lo, hi), want) in cases {
            assert_eq!(axis_label(v, lo, hi), want, "{v} on [{lo}, {hi}]");
        }
    }
}
