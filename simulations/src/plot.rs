//! Charts of the results, as SVG (plotters' SVG backend: no system fonts needed).
//!
//! Each chart reads the CSV files a `run` wrote (`<name>.csv`, `<name>-perf.csv`) from the
//! results directory, so charts can be redrawn without running anything again.

use std::path::{Path, PathBuf};

use plotters::coord::Shift;
use plotters::prelude::*;

/// Why a chart could not be drawn.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PlotError {
    /// A CSV file is missing or unreadable.
    #[error(
        "cannot read {path}: {source} (run the scenario first: `simulations run simulations/scenarios/<name>.toml`)"
    )]
    Read {
        /// The file.
        path: String,
        /// The error.
        source: std::io::Error,
    },
    /// A CSV file lacks a column or holds a non-number.
    #[error("{path}: {what}")]
    Csv {
        /// The file.
        path: String,
        /// What is wrong.
        what: String,
    },
    /// Drawing failed.
    #[error("cannot draw {path}: {what}")]
    Draw {
        /// The chart.
        path: String,
        /// The backend's message.
        what: String,
    },
}

/// A CSV file as columns of strings.
#[derive(Debug)]
struct Table {
    path: String,
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    fn read(path: &Path) -> Result<Self, PlotError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| PlotError::Read { path: path.display().to_string(), source })?;
        let mut lines = text.lines();
        let header = lines.next().unwrap_or_default().split(',').map(str::to_owned).collect();
        let rows = lines
            .filter(|l| !l.is_empty())
            .map(|l| l.split(',').map(str::to_owned).collect())
            .collect();
        Ok(Self { path: path.display().to_string(), header, rows })
    }

    fn col(&self, name: &str) -> Result<usize, PlotError> {
        self.header.iter().position(|h| h == name).ok_or_else(|| PlotError::Csv {
            path: self.path.clone(),
            what: format!("no column {name}"),
        })
    }

    fn num(&self, row: usize, name: &str) -> Result<f64, PlotError> {
        let c = self.col(name)?;
        let v = self.rows.get(row).and_then(|r| r.get(c)).map_or("", String::as_str);
        v.parse().map_err(|_| PlotError::Csv {
            path: self.path.clone(),
            what: format!("row {row}: {name} = {v:?} is not a number"),
        })
    }

    fn text(&self, row: usize, name: &str) -> Result<String, PlotError> {
        let c = self.col(name)?;
        Ok(self.rows.get(row).and_then(|r| r.get(c)).cloned().unwrap_or_default())
    }

    /// `(x, y)` points of the rows that pass `keep`, sorted by x.
    fn series(
        &self,
        x: &str,
        y: impl Fn(&Self, usize) -> Result<f64, PlotError>,
        keep: impl Fn(&Self, usize) -> bool,
    ) -> Result<Vec<(f64, f64)>, PlotError> {
        let mut out = Vec::new();
        for i in 0..self.rows.len() {
            if keep(self, i) {
                out.push((self.num(i, x)?, y(self, i)?));
            }
        }
        out.sort_by(|a, b| a.0.total_cmp(&b.0));
        Ok(out)
    }
}

/// One line of a panel.
struct Line {
    label: String,
    color: RGBColor,
    dashed: bool,
    points: Vec<(f64, f64)>,
}

/// One panel: a titled chart with labelled axes.
struct Panel {
    title: String,
    x_desc: String,
    y_desc: String,
    log_x: bool,
    log_y: bool,
    legend: SeriesLabelPosition,
    lines: Vec<Line>,
}

/// A tick label: no decimals for large or whole values, a few for small ones.
fn tick(v: &f64) -> String {
    let a = v.abs();
    if a >= 10.0 || (a - a.round()).abs() < 1e-9 {
        format!("{v:.0}")
    } else if a >= 1.0 {
        format!("{v:.1}")
    } else if a >= 0.01 {
        format!("{v:.2}")
    } else {
        format!("{v}")
    }
}

const COLORS: [RGBColor; 5] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
    RGBColor(255, 127, 14),
];

fn draw_err(path: &Path) -> impl Fn(String) -> PlotError + '_ {
    move |what| PlotError::Draw { path: path.display().to_string(), what }
}

fn range(lines: &[Line], axis: impl Fn(&(f64, f64)) -> f64, log: bool) -> (f64, f64) {
    let vals: Vec<f64> = lines.iter().flat_map(|l| l.points.iter().map(&axis)).collect();
    let (lo, hi) =
        vals.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &v| (a.min(v), b.max(v)));
    if !lo.is_finite() {
        return (if log { 1.0 } else { 0.0 }, 1.0);
    }
    if log {
        let lo = vals.iter().copied().filter(|v| *v > 0.0).fold(f64::INFINITY, f64::min);
        let lo = if lo.is_finite() { lo } else { 1.0 };
        (lo / 2.0, (hi * 2.0).max(lo * 4.0))
    } else {
        let top = if hi > 0.0 { hi * 1.15 } else { 1.0 };
        (lo.min(0.0), top)
    }
}

fn draw_panel<DB: DrawingBackend>(area: &DrawingArea<DB, Shift>, p: &Panel) -> Result<(), String> {
    let (x0, x1) = range(&p.lines, |q| q.0, p.log_x);
    let (y0, y1) = range(&p.lines, |q| q.1, p.log_y);
    let mut b = ChartBuilder::on(area);
    b.caption(&p.title, ("sans-serif", 20)).margin(12).x_label_area_size(44).y_label_area_size(70);
    // Four coordinate combinations, one drawing routine.
    macro_rules! body {
        ($chart:expr) => {{
            let mut chart = $chart.map_err(|e| e.to_string())?;
            chart
                .configure_mesh()
                .x_desc(p.x_desc.as_str())
                .y_desc(p.y_desc.as_str())
                .label_style(("sans-serif", 14))
                .x_label_formatter(&|v| tick(v))
                .y_label_formatter(&|v| tick(v))
                .axis_desc_style(("sans-serif", 16))
                .light_line_style(WHITE.mix(0.0))
                .draw()
                .map_err(|e| e.to_string())?;
            for line in &p.lines {
                let color = line.color;
                let style = ShapeStyle { color: color.to_rgba(), filled: false, stroke_width: 2 };
                if line.dashed {
                    chart
                        .draw_series(DashedLineSeries::new(
                            line.points.iter().copied(),
                            8,
                            5,
                            style,
                        ))
                        .map_err(|e| e.to_string())?
                        .label(line.label.as_str())
                        .legend(move |(x, y)| {
                            EmptyElement::at((x, y))
                                + PathElement::new(vec![(0, 0), (7, 0)], color.stroke_width(2))
                                + PathElement::new(vec![(13, 0), (20, 0)], color.stroke_width(2))
                        });
                } else {
                    chart
                        .draw_series(LineSeries::new(line.points.iter().copied(), style))
                        .map_err(|e| e.to_string())?
                        .label(line.label.as_str())
                        .legend(move |(x, y)| {
                            PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
                        });
                }
                chart
                    .draw_series(
                        line.points.iter().map(|&(x, y)| Circle::new((x, y), 4, color.filled())),
                    )
                    .map_err(|e| e.to_string())?;
            }
            chart
                .configure_series_labels()
                .position(p.legend.clone())
                .label_font(("sans-serif", 14))
                .background_style(WHITE.mix(0.85))
                .border_style(BLACK.mix(0.4))
                .draw()
                .map_err(|e| e.to_string())?;
        }};
    }
    match (p.log_x, p.log_y) {
        (true, true) => body!(b.build_cartesian_2d((x0..x1).log_scale(), (y0..y1).log_scale())),
        (true, false) => body!(b.build_cartesian_2d((x0..x1).log_scale(), y0..y1)),
        (false, true) => body!(b.build_cartesian_2d(x0..x1, (y0..y1).log_scale())),
        (false, false) => body!(b.build_cartesian_2d(x0..x1, y0..y1)),
    }
    Ok(())
}

fn draw(
    path: &Path,
    title: &str,
    layout: (usize, usize),
    panels: &[Panel],
) -> Result<(), PlotError> {
    let size = (560 * layout.1 as u32, 430 * layout.0 as u32 + 40);
    let root = SVGBackend::new(path, size).into_drawing_area();
    let err = draw_err(path);
    root.fill(&WHITE).map_err(|e| err(e.to_string()))?;
    let root = root.titled(title, ("sans-serif", 24)).map_err(|e| err(e.to_string()))?;
    let areas = root.split_evenly(layout);
    for (area, panel) in areas.iter().zip(panels) {
        draw_panel(area, panel).map_err(&err)?;
    }
    root.present().map_err(|e| err(e.to_string()))?;
    Ok(())
}

fn line(label: &str, color: usize, points: Vec<(f64, f64)>) -> Line {
    Line { label: label.to_owned(), color: COLORS[color % COLORS.len()], dashed: false, points }
}

fn dashed(label: &str, color: usize, points: Vec<(f64, f64)>) -> Line {
    Line { dashed: true, ..line(label, color, points) }
}

fn all(_: &Table, _: usize) -> bool {
    true
}

fn col(name: &'static str) -> impl Fn(&Table, usize) -> Result<f64, PlotError> {
    move |t, i| t.num(i, name)
}

fn scaled(name: &'static str, factor: f64) -> impl Fn(&Table, usize) -> Result<f64, PlotError> {
    move |t, i| Ok(t.num(i, name)? * factor)
}

fn panel(
    title: &str,
    x: &str,
    y: &str,
    log: (bool, bool),
    legend: SeriesLabelPosition,
    lines: Vec<Line>,
) -> Panel {
    Panel {
        title: title.to_owned(),
        x_desc: x.to_owned(),
        y_desc: y.to_owned(),
        log_x: log.0,
        log_y: log.1,
        legend,
        lines,
    }
}

const SITES: &str = "sites (log scale)";

/// `scale.svg`: completion time, delivery latency, traffic and bytes per job, and the
/// simulator's memory and wall time against the federation's size.
pub fn scale(dir: &Path) -> Result<PathBuf, PlotError> {
    use SeriesLabelPosition::{LowerRight, UpperLeft};
    let t = Table::read(&dir.join("scale.csv"))?;
    let perf = Table::read(&dir.join("scale-perf.csv"))?;
    let out = dir.join("scale.svg");
    let kib = 1.0 / 1024.0;
    let panels = [
        panel(
            "Workflow completion time",
            SITES,
            "seconds from submission to end",
            (true, false),
            LowerRight,
            vec![line(
                "one workflow per federation size",
                0,
                t.series("sites", col("completion_mean_s"), all)?,
            )],
        ),
        panel(
            "Job manifest delivery",
            SITES,
            "milliseconds from dispatch to the runner",
            (true, false),
            UpperLeft,
            vec![
                line("mean", 0, t.series("sites", scaled("delivery_mean_s", 1000.0), all)?),
                dashed("slowest", 1, t.series("sites", scaled("delivery_max_s", 1000.0), all)?),
            ],
        ),
        panel(
            "Traffic per job",
            SITES,
            "per dispatched job",
            (true, false),
            LowerRight,
            vec![
                line(
                    "signed messages (manifest + updates)",
                    0,
                    t.series("sites", col("messages_per_job"), all)?,
                ),
                dashed(
                    "round trips (requests + result streams)",
                    1,
                    t.series("sites", col("round_trips_per_job"), all)?,
                ),
            ],
        ),
        panel(
            "Bytes per job",
            SITES,
            "KiB per dispatched job",
            (true, false),
            UpperLeft,
            vec![
                line(
                    "control: requests and answers",
                    0,
                    t.series("sites", scaled("control_bytes_per_job", kib), all)?,
                ),
                line(
                    "result bundles",
                    2,
                    t.series("sites", scaled("result_bytes_per_job", kib), all)?,
                ),
            ],
        ),
        panel(
            "Simulator memory",
            SITES,
            "KiB of peak heap per simulated site",
            (true, false),
            LowerRight,
            vec![line(
                "peak heap / sites",
                3,
                perf.series("sites", scaled("heap_per_site_bytes", kib), all)?,
            )],
        ),
        panel(
            "Simulator wall time (release, 2 cores)",
            SITES,
            "seconds (log scale)",
            (true, true),
            UpperLeft,
            vec![line("one run, setup included", 4, perf.series("sites", col("wall_s"), all)?)],
        ),
    ];
    draw(&out, "Scale: one federated-statistics workflow over every site", (2, 3), &panels)?;
    Ok(out)
}

/// `partitions.svg`: completion time and retries against the fraction cut off.
pub fn partitions(dir: &Path) -> Result<PathBuf, PlotError> {
    use SeriesLabelPosition::{LowerRight, UpperLeft};
    let t = Table::read(&dir.join("partitions.csv"))?;
    let out = dir.join("partitions.svg");
    let x = "partition_fraction";
    let pct =
        |pts: Vec<(f64, f64)>| pts.into_iter().map(|(x, y)| (x * 100.0, y)).collect::<Vec<_>>();
    let xd = "sites cut off for 10 minutes (%)";
    let panels = [
        panel(
            "Completion time",
            xd,
            "seconds from submission to end",
            (false, false),
            LowerRight,
            vec![
                line(
                    "statistics over all sites (mean)",
                    0,
                    pct(t.series(x, col("completion_statistics_s"), all)?),
                ),
                line(
                    "best-site trainings (mean)",
                    2,
                    pct(t.series(x, col("completion_best_s"), all)?),
                ),
                dashed("slowest workflow", 1, pct(t.series(x, col("completion_max_s"), all)?)),
            ],
        ),
        panel(
            "Delivery retries",
            xd,
            "count over the run",
            (false, false),
            UpperLeft,
            vec![
                line(
                    "failed requests (outbox resends)",
                    0,
                    pct(t.series(x, col("requests_failed"), all)?),
                ),
                line(
                    "failed result transfers (retried)",
                    3,
                    pct(t.series(x, col("result_failures"), all)?),
                ),
            ],
        ),
        panel(
            "Job retries",
            xd,
            "jobs (of 100 trainings)",
            (false, false),
            UpperLeft,
            vec![
                line("moved off a lost runner", 1, pct(t.series(x, col("job_retries"), all)?)),
                dashed("workflows failed", 4, pct(t.series(x, col("failed"), all)?)),
            ],
        ),
    ];
    draw(&out, "Partitions: 1,000 sites, a fraction unreachable for 10 minutes", (1, 3), &panels)?;
    Ok(out)
}

/// `baseline-polling.svg`: push delivery against Kaapana-style polling, for jobs of 20 to
/// 40 s (`baseline-polling.csv`) and, when present, for no-op jobs (`baseline-noop.csv`).
pub fn baseline(dir: &Path) -> Result<PathBuf, PlotError> {
    use SeriesLabelPosition::{MiddleRight, UpperLeft};
    let t = Table::read(&dir.join("baseline-polling.csv"))?;
    let noop_path = dir.join("baseline-noop.csv");
    let noop = if noop_path.exists() { Some(Table::read(&noop_path)?) } else { None };
    let out = dir.join("baseline-polling.svg");
    let is =
        |d: &'static str| move |t: &Table, i: usize| t.text(i, "delivery").is_ok_and(|v| v == d);
    let kib = 1.0 / 1024.0;
    let mut completion = vec![
        line("push, 20-40 s jobs", 0, t.series("sites", col("completion_mean_s"), is("push"))?),
        line(
            "poll every 5 s, 20-40 s jobs",
            1,
            t.series("sites", col("completion_mean_s"), is("poll"))?,
        ),
    ];
    if let Some(n) = &noop {
        completion.push(dashed(
            "push, no-op jobs",
            0,
            n.series("sites", col("completion_mean_s"), is("push"))?,
        ));
        completion.push(dashed(
            "poll every 5 s, no-op jobs",
            1,
            n.series("sites", col("completion_mean_s"), is("poll"))?,
        ));
    }
    let panels = [
        panel(
            "Workflow completion time",
            SITES,
            "seconds from submission to end",
            (true, false),
            MiddleRight,
            completion,
        ),
        panel(
            "Job manifest delivery",
            SITES,
            "seconds from dispatch to the runner (log)",
            (true, true),
            MiddleRight,
            vec![
                line("push", 0, t.series("sites", col("delivery_mean_s"), is("push"))?),
                line("poll every 5 s", 1, t.series("sites", col("delivery_mean_s"), is("poll"))?),
            ],
        ),
        panel(
            "Round trips per job (20-40 s jobs)",
            SITES,
            "round trips per dispatched job",
            (true, false),
            UpperLeft,
            vec![
                line(
                    "push: workflow traffic",
                    0,
                    t.series("sites", col("round_trips_per_job"), is("push"))?,
                ),
                dashed(
                    "push: + keepalive pings every 5 s",
                    0,
                    t.series("sites", col("all_round_trips_per_job"), is("push"))?,
                ),
                line(
                    "poll: polls with traffic",
                    1,
                    t.series("sites", col("round_trips_per_job"), is("poll"))?,
                ),
                dashed(
                    "poll: + empty polls",
                    1,
                    t.series("sites", col("all_round_trips_per_job"), is("poll"))?,
                ),
            ],
        ),
        panel(
            "Control bytes per job (20-40 s jobs)",
            SITES,
            "KiB per dispatched job, transport included",
            (true, false),
            UpperLeft,
            vec![
                line(
                    "push: workflow traffic",
                    0,
                    t.series("sites", scaled("control_bytes_per_job", kib), is("push"))?,
                ),
                dashed(
                    "push: + keepalive pings",
                    0,
                    t.series("sites", scaled("all_control_bytes_per_job", kib), is("push"))?,
                ),
                line(
                    "poll: polls with traffic",
                    1,
                    t.series("sites", scaled("control_bytes_per_job", kib), is("poll"))?,
                ),
                dashed(
                    "poll: + empty polls",
                    1,
                    t.series("sites", scaled("all_control_bytes_per_job", kib), is("poll"))?,
                ),
            ],
        ),
    ];
    draw(
        &out,
        "Baseline: push delivery vs polling every 5 s (one federated-statistics workflow)",
        (2, 2),
        &panels,
    )?;
    Ok(out)
}

/// The variants of a table, in the order of their first row.
fn variants(t: &Table) -> Result<Vec<String>, PlotError> {
    let mut out: Vec<String> = Vec::new();
    for i in 0..t.rows.len() {
        let v = t.text(i, "variant")?;
        if !out.contains(&v) {
            out.push(v);
        }
    }
    Ok(out)
}

/// `(round, y)` of variant `v`'s rounds that have a value in every column `y` adds up
/// (an open round has no duration).
fn per_round(t: &Table, v: &str, y: &[&str]) -> Result<Vec<(f64, f64)>, PlotError> {
    let mut out = Vec::new();
    for i in 0..t.rows.len() {
        if t.text(i, "variant")? != v || y.iter().any(|c| t.text(i, c).is_ok_and(|s| s.is_empty()))
        {
            continue;
        }
        let mut sum = 0.0;
        for c in y {
            sum += t.num(i, c)?;
        }
        out.push((t.num(i, "round")?, sum));
    }
    out.sort_by(|a, b| a.0.total_cmp(&b.0));
    Ok(out)
}

/// `training.svg`: round durations and updates per round of the training under partitions
/// (`training-partitions-rounds.csv`) and, when present, with late updates dropped or folded
/// (`training-rounds.csv`).
pub fn training(dir: &Path) -> Result<PathBuf, PlotError> {
    use SeriesLabelPosition::{LowerRight, UpperRight};
    let t = Table::read(&dir.join("training-partitions-rounds.csv"))?;
    let out = dir.join("training.svg");
    let cuts = variants(&t)?;
    let label = |v: &str| match v.strip_prefix("cut=") {
        Some(f) => format!("{:.0} % cut off", f.parse::<f64>().unwrap_or(0.0) * 100.0),
        None => v.to_owned(),
    };
    let mut duration = Vec::new();
    let mut updates = Vec::new();
    for (k, v) in cuts.iter().enumerate() {
        duration.push(line(&label(v), k, per_round(&t, v, &["duration_s"])?));
        updates.push(line(&label(v), k, per_round(&t, v, &["updates", "folded"])?));
    }
    let mut panels = vec![
        panel(
            "Round duration under a partition",
            "round",
            "seconds from opening to model (log scale)",
            (false, true),
            UpperRight,
            duration,
        ),
        panel(
            "Updates aggregated per round",
            "round",
            "updates (own and folded)",
            (false, false),
            LowerRight,
            updates,
        ),
    ];
    let late_path = dir.join("training-rounds.csv");
    if late_path.exists() {
        let l = Table::read(&late_path)?;
        let mut lines = Vec::new();
        for (k, v) in variants(&l)?.iter().enumerate() {
            lines.push(line(&format!("{v}: own"), k, per_round(&l, v, &["updates"])?));
            lines.push(dashed(
                &format!("{v}: own + folded"),
                k,
                per_round(&l, v, &["updates", "folded"])?,
            ));
        }
        panels.push(panel(
            "Late updates dropped or folded",
            "round",
            "updates aggregated",
            (false, false),
            LowerRight,
            lines,
        ));
    }
    let layout = (1, panels.len());
    draw(&out, "Training: 1,000 sites, 100 rounds, quorum 80 %, 10 % stragglers", layout, &panels)?;
    Ok(out)
}

/// Draws every chart whose CSV files exist; returns the files written.
pub fn plot_all(dir: &Path) -> Result<Vec<PathBuf>, PlotError> {
    type Chart = fn(&Path) -> Result<PathBuf, PlotError>;
    let charts: [(&str, Chart); 4] = [
        ("scale", scale),
        ("partitions", partitions),
        ("baseline-polling", baseline),
        ("training-partitions-rounds", training),
    ];
    let mut out = Vec::new();
    for (name, chart) in charts {
        if dir.join(format!("{name}.csv")).exists() {
            out.push(chart(dir)?);
        }
    }
    if out.is_empty() {
        return Err(PlotError::Read {
            path: dir.display().to_string(),
            source: std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "no scale.csv, partitions.csv, baseline-polling.csv or training-partitions-rounds.csv",
            ),
        });
    }
    Ok(out)
}
