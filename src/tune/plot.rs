//! The time-vs-channels plot of a tune (PNG): one panel per shape, one line per
//! op and row type (for each channel count, its best chunk), the chosen points
//! circled.
//!
//! Text needs a TrueType font, found at run time: `SWITCHYARD_PLOT_FONT`, else
//! DejaVu Sans or Liberation Sans where Debian and Ubuntu put them, else the
//! DejaVu Sans that matplotlib ships, else any `.ttf` under the system font
//! directories. A machine with none (GPU hosts often have none) can draw the
//! plot later from the curve JSON: `switchyard plot CURVE.json`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use plotters::prelude::*;

use super::{TuneOutcome, WorkloadTune};
use crate::config::TunedOp;
use crate::error::{Error, Result};

/// Environment variable naming a .ttf file for the plot's text.
pub const FONT_ENV: &str = "SWITCHYARD_PLOT_FONT";

const FONT_PATHS: [&str; 4] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/usr/share/fonts/liberation/LiberationSans-Regular.ttf",
];

/// Directories searched, last, for any `.ttf`.
const FONT_DIRS: [&str; 2] = ["/usr/share/fonts", "/usr/local/share/fonts"];

/// matplotlib's own copy of DejaVu Sans, under the usual Python package directories.
fn matplotlib_fonts() -> Vec<PathBuf> {
    let mut out = Vec::new();
    for root in ["/usr/lib", "/usr/local/lib", "/opt/conda/lib"] {
        let Ok(dirs) = std::fs::read_dir(root) else { continue };
        for d in dirs.flatten().filter(|d| d.file_name().to_string_lossy().starts_with("python3")) {
            for pkgs in ["site-packages", "dist-packages"] {
                out.push(d.path().join(pkgs).join("matplotlib/mpl-data/fonts/ttf/DejaVuSans.ttf"));
            }
        }
    }
    out
}

/// The first `.ttf` under `dir` (depth-first, names sorted), at most 4 levels down.
fn any_ttf(dir: &Path, depth: usize) -> Option<PathBuf> {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir).ok()?.flatten().map(|e| e.path()).collect();
    entries.sort();
    let file = entries.iter().find(|p| p.is_file() && p.extension().is_some_and(|e| e.eq_ignore_ascii_case("ttf")));
    file.cloned()
        .or_else(|| (depth > 0).then(|| entries.iter().filter(|p| p.is_dir()).find_map(|d| any_ttf(d, depth - 1))).flatten())
}

/// Whether a font for the plot's text can be found on this machine.
pub fn font_available() -> bool {
    ensure_font().is_ok()
}

/// Register a font once for the process (plotters keeps fonts in a global table).
fn ensure_font() -> Result<()> {
    static FONT: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    FONT.get_or_init(|| {
        let candidates: Vec<PathBuf> = std::env::var_os(FONT_ENV)
            .map(PathBuf::from)
            .into_iter()
            .chain(FONT_PATHS.iter().map(PathBuf::from))
            .chain(matplotlib_fonts())
            .collect();
        let path = candidates
            .into_iter()
            .find(|p| p.is_file())
            .or_else(|| FONT_DIRS.iter().find_map(|d| any_ttf(Path::new(d), 4)))
            .ok_or_else(|| {
                format!("no TrueType font for the plot's text: set {FONT_ENV} to a .ttf file or install fonts-dejavu-core")
            })?;
        let bytes = std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        // plotters wants the bytes for the life of the process.
        let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
        plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
            .map_err(|_| format!("{}: not a usable TrueType font", path.display()))
    })
    .clone()
    .map_err(|reason| Error::InvalidArgument { arg: FONT_ENV.into(), reason })
}

/// One line: (op, row type) -> channels -> best time.
type Series = BTreeMap<(TunedOp, String), BTreeMap<usize, f64>>;

fn series_of(workloads: &[&WorkloadTune]) -> Series {
    let mut s = Series::new();
    for w in workloads {
        for p in w.points.iter().filter(|p| p.wrong == 0) {
            for op in [TunedOp::Dispatch, TunedOp::Combine] {
                // Combine rows are BF16 whichever dispatch type the run had: one line.
                let label = if op == TunedOp::Combine { "bf16".to_string() } else { w.dtype.to_string() };
                let line = s.entry((op, label)).or_default();
                let t = p.time_us(op);
                let best = line.entry(p.config.num_channels).or_insert(t);
                *best = best.min(t);
            }
        }
    }
    s
}

fn err(path: &Path) -> impl Fn(String) -> Error + '_ {
    move |reason| Error::Io { path: path.into(), source: std::io::Error::other(reason) }
}

/// Draw the outcome's curves to a PNG at `path`.
pub fn write_png(outcome: &TuneOutcome, title: &str, path: &Path) -> Result<()> {
    ensure_font()?;
    let mut shapes: Vec<&str> = Vec::new();
    for w in &outcome.workloads {
        if !shapes.contains(&w.shape.name.as_str()) {
            shapes.push(&w.shape.name);
        }
    }
    let panels = shapes.len().max(1);
    let root = BitMapBackend::new(path, (640 * panels as u32, 480)).into_drawing_area();
    let e = err(path);
    root.fill(&WHITE).map_err(|x| e(x.to_string()))?;
    let root = root.titled(title, ("sans-serif", 18)).map_err(|x| e(x.to_string()))?;
    let areas = root.split_evenly((1, panels));
    let colours = [BLUE, RED, GREEN, MAGENTA, CYAN, BLACK];
    for (area, shape) in areas.iter().zip(&shapes) {
        let ws: Vec<&WorkloadTune> = outcome.workloads.iter().filter(|w| w.shape.name == *shape).collect();
        let series = series_of(&ws);
        let xs = series.values().flat_map(|l| l.keys().copied());
        let x_max = xs.max().unwrap_or(1) as f64;
        let y_max = series.values().flat_map(|l| l.values().copied()).fold(0.0, f64::max).max(1e-3);
        let tokens = ws.first().map(|w| w.shape.tokens).unwrap_or(0);
        let mut chart = ChartBuilder::on(area)
            .caption(format!("{shape} ({tokens} tokens/rank)"), ("sans-serif", 16))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(56)
            .build_cartesian_2d(0.0..x_max * 1.08, 0.0..y_max * 1.1)
            .map_err(|x| e(x.to_string()))?;
        chart
            .configure_mesh()
            .x_desc("channels (SMs on a GPU)")
            .y_desc("median time (us)")
            .draw()
            .map_err(|x| e(x.to_string()))?;
        for (i, ((op, dtype), line)) in series.iter().enumerate() {
            let colour = colours[i % colours.len()];
            let pts: Vec<(f64, f64)> = line.iter().map(|(&c, &t)| (c as f64, t)).collect();
            chart
                .draw_series(LineSeries::new(pts.clone(), colour.stroke_width(2)))
                .map_err(|x| e(x.to_string()))?
                .label(format!("{} {dtype}", op.name()))
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], colour.stroke_width(2)));
            chart.draw_series(pts.iter().map(|&p| Circle::new(p, 3, colour.filled()))).map_err(|x| e(x.to_string()))?;
            // The chosen point of this line: a large open circle.
            let chosen = ws.iter().flat_map(|w| &w.choices).find(|c| c.op == *op && c.dtype.to_string() == *dtype);
            if let Some(c) = chosen {
                let p = (c.chosen.num_channels as f64, c.chosen_us);
                chart.draw_series(std::iter::once(Circle::new(p, 8, colour.stroke_width(2)))).map_err(|x| e(x.to_string()))?;
            }
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(|x| e(x.to_string()))?;
    }
    root.present().map_err(|x| e(x.to_string()))?;
    Ok(())
}
