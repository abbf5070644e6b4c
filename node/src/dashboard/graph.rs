//! Drawings for the dashboard, as inline SVG built on the server: a workflow's jobs as a
//! graph (columns by step depth, an arrow from each job to the jobs that read its result) and
//! small charts from the node's metrics histories.
//!
//! Only presentation attributes and classes are used (no `style` attributes), so the pages'
//! Content-Security-Policy can forbid inline styles.

use maud::{Markup, html};

use crate::api::{WorkflowJobView, WorkflowView};
use crate::history::{PeerSample, WorkflowSample};

const NODE_W: u32 = 200;
const NODE_H: u32 = 46;
const COL_GAP: u32 = 64;
const ROW_GAP: u32 = 12;
const PAD: u32 = 8;
/// A step with more jobs than this is drawn as one box with its counts (single-file steps with
/// one job per item).
pub const MAX_JOBS_DRAWN_PER_STEP: usize = 12;

/// The CSS class of a job state word (`running`, `pending (awaiting approval)`, ...).
pub fn state_class(state: &str) -> &'static str {
    match state.split_whitespace().next().unwrap_or("") {
        "finished" => "st-finished",
        "failed" => "st-failed",
        "cancelled" => "st-failed",
        "running" => "st-running",
        "waiting" => "st-waiting",
        _ => "st-queued",
    }
}

/// One box of the graph.
#[derive(Debug, Clone, PartialEq)]
struct Node {
    step: usize,
    x: u32,
    y: u32,
    title: String,
    subtitle: String,
    class: &'static str,
    tooltip: String,
    job_id: Option<String>,
}

/// Depth of each step: 0 for steps without inputs, else one more than its deepest input.
/// Unknown inputs count as depth 0; a cycle (which the planner refuses) cannot loop here.
fn depths(steps: &[(String, Vec<String>)]) -> Vec<usize> {
    let mut depth = vec![0usize; steps.len()];
    // Steps are planned in an order where inputs come first, but do not rely on it: relax
    // at most `steps.len()` times.
    for _ in 0..steps.len() {
        let mut changed = false;
        for (i, (_, inputs)) in steps.iter().enumerate() {
            let d = inputs
                .iter()
                .filter_map(|n| steps.iter().position(|(s, _)| s == n))
                .map(|k| depth[k] + 1)
                .max()
                .unwrap_or(0)
                .min(steps.len());
            if d != depth[i] {
                depth[i] = d;
                changed = true;
            }
        }
        if !changed {
            break;
        }
    }
    depth
}

fn truncate(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_owned()
    } else {
        let mut t: String = s.chars().take(n.saturating_sub(1)).collect();
        t.push('…');
        t
    }
}

fn layout(w: &WorkflowView) -> (Vec<Node>, u32, u32) {
    let depth = depths(&w.steps);
    let columns = depth.iter().copied().max().map_or(0, |d| d + 1);
    let mut rows = vec![0u32; columns];
    let mut nodes = Vec::new();
    for (s, (step_name, _)) in w.steps.iter().enumerate() {
        let col = depth[s];
        let jobs: Vec<&WorkflowJobView> = w.jobs.iter().filter(|j| &j.step == step_name).collect();
        let x = PAD + u32::try_from(col).unwrap_or(0) * (NODE_W + COL_GAP);
        let mut place = |title: String, subtitle: String, class, tooltip, job_id| {
            let y = PAD + rows[col] * (NODE_H + ROW_GAP);
            rows[col] += 1;
            nodes.push(Node { step: s, x, y, title, subtitle, class, tooltip, job_id });
        };
        if jobs.len() > MAX_JOBS_DRAWN_PER_STEP {
            let mut counts: Vec<(String, usize)> = Vec::new();
            for j in &jobs {
                match counts.iter_mut().find(|(s, _)| *s == j.state) {
                    Some((_, n)) => *n += 1,
                    None => counts.push((j.state.clone(), 1)),
                }
            }
            let summary: Vec<String> = counts.iter().map(|(s, n)| format!("{n} {s}")).collect();
            let class = if jobs.iter().all(|j| j.state == "finished") {
                "st-finished"
            } else if jobs.iter().any(|j| j.state == "failed") {
                "st-failed"
            } else {
                "st-running"
            };
            place(
                format!("{step_name} ({} jobs)", jobs.len()),
                truncate(&summary.join(", "), 34),
                class,
                summary.join(", "),
                None,
            );
        } else {
            for j in jobs {
                let why = j.reason.as_deref().map(|r| format!(": {r}")).unwrap_or_default();
                place(
                    truncate(&j.name, 26),
                    truncate(&format!("{} · {}", j.runner, j.state), 34),
                    state_class(&j.state),
                    format!("{} at {}: {}{why}", j.name, j.runner, j.state),
                    Some(j.job_id.clone()),
                );
            }
        }
    }
    let width = PAD * 2 + u32::try_from(columns).unwrap_or(0) * (NODE_W + COL_GAP)
        - if columns > 0 { COL_GAP } else { 0 };
    let height =
        PAD * 2 + rows.iter().copied().max().unwrap_or(0) * (NODE_H + ROW_GAP).saturating_sub(0);
    (nodes, width.max(NODE_W), height.max(NODE_H))
}

/// The workflow's jobs as a graph.
pub fn workflow_graph(w: &WorkflowView) -> Markup {
    let (nodes, width, height) = layout(w);
    let mut edges = Vec::new();
    for (s, (_, inputs)) in w.steps.iter().enumerate() {
        for input in inputs {
            let Some(i) = w.steps.iter().position(|(n, _)| n == input) else { continue };
            for from in nodes.iter().filter(|n| n.step == i) {
                for to in nodes.iter().filter(|n| n.step == s) {
                    if edges.len() < 2_000 {
                        edges.push((from.x + NODE_W, from.y + NODE_H / 2, to.x, to.y + NODE_H / 2));
                    }
                }
            }
        }
    }
    html! {
        svg.graph xmlns="http://www.w3.org/2000/svg" role="img"
            aria-label=(format!("jobs of workflow {}", w.name))
            width=(width) height=(height) viewBox=(format!("0 0 {width} {height}")) {
            defs {
                marker #arrow viewBox="0 0 10 10" refX="10" refY="5" markerWidth="7" markerHeight="7" orient="auto-start-reverse" {
                    path d="M 0 0 L 10 5 L 0 10 z" fill="#7a8797" {}
                }
            }
            @for (x1, y1, x2, y2) in &edges {
                @let mid = (x1 + x2) / 2;
                path.edge d=(format!("M {x1} {y1} C {mid} {y1}, {mid} {y2}, {x2} {y2}"))
                    fill="none" stroke="#7a8797" stroke-width="1.5" marker-end="url(#arrow)" {}
            }
            @for n in &nodes {
                g class=(format!("job {}", n.class)) data-job=[n.job_id.as_deref()] {
                    title { (n.tooltip) }
                    rect x=(n.x) y=(n.y) width=(NODE_W) height=(NODE_H) rx="6" {}
                    text.job-name x=(n.x + 10) y=(n.y + 19) { (n.title) }
                    text.job-sub x=(n.x + 10) y=(n.y + 36) { (n.subtitle) }
                }
            }
        }
    }
}

const CHART_W: u32 = 640;
const CHART_H: u32 = 140;
const AXIS: u32 = 24;

fn seconds_label(ms: u64) -> String {
    let s = ms / 1000;
    if s < 120 {
        format!("{s} s")
    } else if s < 7200 {
        format!("{} min", s / 60)
    } else {
        format!("{} h", s / 3600)
    }
}

/// A workflow's jobs over time: stacked areas of finished, failed, running and the rest, from
/// its recorded counts (`samples`) up to `now_ms` (or its end).
pub fn workflow_chart(samples: &[WorkflowSample], end_ms: u64) -> Markup {
    if samples.is_empty() {
        return html! { p.muted { "No job counts recorded for this workflow since the node started." } };
    }
    let t0 = samples[0].at_ms;
    let t1 = end_ms.max(samples[samples.len() - 1].at_ms).max(t0 + 1);
    // A margin after the end, so that the final counts show as a band of their own.
    let t1 = t1 + (t1 - t0) / 20;
    let total = samples
        .iter()
        .map(|s| s.waiting + s.queued + s.running + s.finished + s.failed)
        .max()
        .unwrap_or(1)
        .max(1);
    let plot_w = f64::from(CHART_W - AXIS - 8);
    let plot_h = f64::from(CHART_H - AXIS - 8);
    let x = |t: u64| f64::from(AXIS) + plot_w * (t - t0) as f64 / (t1 - t0) as f64;
    let y = |v: u32| 8.0 + plot_h * (1.0 - f64::from(v) / f64::from(total));
    // Stack from the bottom: finished, failed, running, queued + waiting.
    type Layer = fn(&WorkflowSample) -> u32;
    let layers: [(&str, &str, Layer); 4] = [
        ("finished", "st-finished", |s| s.finished),
        ("failed", "st-failed", |s| s.failed),
        ("running", "st-running", |s| s.running),
        ("queued or waiting", "st-queued", |s| s.queued + s.waiting),
    ];
    let mut areas = Vec::new();
    for k in 0..layers.len() {
        let below = |s: &WorkflowSample| layers[..k].iter().map(|(_, _, f)| f(s)).sum::<u32>();
        let top = |s: &WorkflowSample| below(s) + (layers[k].2)(s);
        // A step function: each sample holds until the next one (or the end).
        let mut upper = Vec::new();
        let mut lower = Vec::new();
        for (i, s) in samples.iter().enumerate() {
            let next = samples.get(i + 1).map_or(t1, |n| n.at_ms);
            upper.push(format!("{:.1},{:.1}", x(s.at_ms), y(top(s))));
            upper.push(format!("{:.1},{:.1}", x(next), y(top(s))));
            lower.push(format!("{:.1},{:.1}", x(s.at_ms), y(below(s))));
            lower.push(format!("{:.1},{:.1}", x(next), y(below(s))));
        }
        lower.reverse();
        upper.extend(lower);
        areas.push((layers[k].0, layers[k].1, upper.join(" ")));
    }
    let last = samples[samples.len() - 1];
    html! {
        figure.chart {
            svg xmlns="http://www.w3.org/2000/svg" role="img" aria-label="jobs over time"
                width=(CHART_W) height=(CHART_H) viewBox=(format!("0 0 {CHART_W} {CHART_H}")) {
                @for (name, class, points) in &areas {
                    polygon class=(format!("area {class}")) points=(points) { title { (name) } }
                }
                line.axis x1=(AXIS) y1=(CHART_H - AXIS) x2=(CHART_W - 8) y2=(CHART_H - AXIS) {}
                line.axis x1=(AXIS) y1="8" x2=(AXIS) y2=(CHART_H - AXIS) {}
                text.tick x=(AXIS - 4) y="16" text-anchor="end" { (total) }
                text.tick x=(AXIS - 4) y=(CHART_H - AXIS) text-anchor="end" { "0" }
                text.tick x=(AXIS) y=(CHART_H - 8) { "0 s" }
                text.tick x=(CHART_W - 8) y=(CHART_H - 8) text-anchor="end" { (seconds_label(t1 - t0)) }
            }
            figcaption {
                "Jobs over time: "
                span.key.st-finished { "finished " (last.finished) }
                span.key.st-failed { "failed " (last.failed) }
                span.key.st-running { "running " (last.running) }
                span.key.st-queued { "queued or waiting " (last.queued + last.waiting) }
            }
        }
    }
}

/// An instance's messages per sampling interval (in and out) and its rejections, from the
/// samples of its cumulative counters; `now` is appended as the latest point.
pub fn peer_chart(samples: &[PeerSample], now: PeerSample) -> Markup {
    let mut all: Vec<PeerSample> = samples.to_vec();
    if all.last().is_none_or(|l| l.at_ms < now.at_ms) {
        all.push(now);
    }
    if all.len() < 2 {
        return html! { p.muted { "Collecting: the counters are sampled every 10 s." } };
    }
    let deltas: Vec<(u64, u64, u64, u64)> = all
        .windows(2)
        .map(|w| {
            let (a, b) = (w[0].counts, w[1].counts);
            (
                b.messages_in.saturating_sub(a.messages_in),
                b.messages_out.saturating_sub(a.messages_out),
                (b.rejected_in + b.rejected_out).saturating_sub(a.rejected_in + a.rejected_out),
                w[1].at_ms,
            )
        })
        .collect();
    let max = deltas.iter().map(|d| d.0.max(d.1).max(d.2)).max().unwrap_or(1).max(1);
    let n = deltas.len();
    let plot_w = f64::from(CHART_W - AXIS - 8);
    let plot_h = f64::from(CHART_H - AXIS - 8);
    let slot = plot_w / n as f64;
    let bar = (slot / 3.0).max(0.5);
    let h = |v: u64| plot_h * v as f64 / max as f64;
    let base = f64::from(CHART_H - AXIS);
    let span = all[all.len() - 1].at_ms - all[0].at_ms;
    let totals = (
        deltas.iter().map(|d| d.0).sum::<u64>(),
        deltas.iter().map(|d| d.1).sum::<u64>(),
        deltas.iter().map(|d| d.2).sum::<u64>(),
    );
    html! {
        figure.chart {
            svg xmlns="http://www.w3.org/2000/svg" role="img" aria-label="messages and rejections over time"
                width=(CHART_W) height=(CHART_H) viewBox=(format!("0 0 {CHART_W} {CHART_H}")) {
                @for (i, (m_in, m_out, rej, _)) in deltas.iter().enumerate() {
                    @let x0 = f64::from(AXIS) + slot * i as f64;
                    rect.bar-in x=(format!("{x0:.1}")) y=(format!("{:.1}", base - h(*m_in))) width=(format!("{bar:.1}")) height=(format!("{:.1}", h(*m_in))) {}
                    rect.bar-out x=(format!("{:.1}", x0 + bar)) y=(format!("{:.1}", base - h(*m_out))) width=(format!("{bar:.1}")) height=(format!("{:.1}", h(*m_out))) {}
                    rect.bar-rej x=(format!("{:.1}", x0 + 2.0 * bar)) y=(format!("{:.1}", base - h(*rej))) width=(format!("{bar:.1}")) height=(format!("{:.1}", h(*rej))) {}
                }
                line.axis x1=(AXIS) y1=(CHART_H - AXIS) x2=(CHART_W - 8) y2=(CHART_H - AXIS) {}
                text.tick x=(AXIS - 4) y="16" text-anchor="end" { (max) }
                text.tick x=(AXIS) y=(CHART_H - 8) { "−" (seconds_label(span)) }
                text.tick x=(CHART_W - 8) y=(CHART_H - 8) text-anchor="end" { "now" }
            }
            figcaption {
                "Messages per interval over the last " (seconds_label(span)) ": "
                span.key.bar-in { "in " (totals.0) }
                span.key.bar-out { "out " (totals.1) }
                span.key.bar-rej { "rejected " (totals.2) }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(name: &str, step: &str, state: &str) -> WorkflowJobView {
        WorkflowJobView {
            name: name.into(),
            step: step.into(),
            job_id: format!("id-{name}"),
            runner: "site-b".into(),
            attempt: 0,
            state: state.into(),
            reason: None,
            result: None,
            samples: None,
        }
    }

    fn workflow(steps: &[(&str, &[&str])], jobs: Vec<WorkflowJobView>) -> WorkflowView {
        WorkflowView {
            workflow_id: "w".into(),
            name: "stats".into(),
            state: "running".into(),
            reason: None,
            progress: String::new(),
            created_at: String::new(),
            ended_at: None,
            steps: steps
                .iter()
                .map(|(n, i)| ((*n).to_owned(), i.iter().map(|s| (*s).to_owned()).collect()))
                .collect(),
            jobs,
            training: None,
        }
    }

    #[test]
    fn steps_are_columns_by_depth_and_each_input_is_an_arrow() {
        let w = workflow(
            &[("site", &[]), ("merge", &["site"]), ("report", &["merge", "site"])],
            vec![
                job("site-1", "site", "finished"),
                job("site-2", "site", "running"),
                job("merge", "merge", "waiting"),
                job("report", "report", "waiting"),
            ],
        );
        assert_eq!(depths(&w.steps), [0, 1, 2]);
        let (nodes, width, _) = layout(&w);
        let xs: Vec<u32> = nodes.iter().map(|n| n.x).collect();
        assert_eq!(xs[0], xs[1], "jobs of one step share a column");
        assert!(xs[2] > xs[0] && xs[3] > xs[2]);
        assert!(width >= xs[3] + NODE_W);
        let svg = workflow_graph(&w).into_string();
        // site→merge: 2, merge→report: 1, site→report: 2.
        assert_eq!(svg.matches("class=\"edge\"").count(), 5);
        assert!(svg.contains("data-job=\"id-site-2\""));
        assert!(svg.contains("job st-running"));
        assert!(!svg.contains("style="), "no inline styles (CSP)");
    }

    #[test]
    fn a_large_single_file_step_is_one_box_with_counts() {
        let mut jobs: Vec<_> =
            (0..40).map(|i| job(&format!("seg-{i}"), "seg", "finished")).collect();
        jobs[3].state = "failed".into();
        let w = workflow(&[("seg", &[])], jobs);
        let svg = workflow_graph(&w).into_string();
        assert!(svg.contains("seg (40 jobs)"), "{svg}");
        assert!(svg.contains("39 finished, 1 failed"));
        assert_eq!(svg.matches("<rect").count(), 1);
    }

    #[test]
    fn names_are_escaped() {
        let w = workflow(&[("s", &[])], vec![job("<script>", "s", "running")]);
        let svg = workflow_graph(&w).into_string();
        assert!(!svg.contains("<script>") && svg.contains("&lt;script&gt;"));
    }

    #[test]
    fn charts_draw_their_samples() {
        let s = |at_ms, running, finished| WorkflowSample {
            at_ms,
            waiting: 0,
            queued: 0,
            running,
            finished,
            failed: 0,
        };
        let svg =
            workflow_chart(&[s(0, 3, 0), s(5_000, 1, 2), s(9_000, 0, 3)], 10_000).into_string();
        assert_eq!(svg.matches("<polygon").count(), 4);
        assert!(svg.contains("finished 3") && svg.contains("10 s"), "{svg}");
        assert!(workflow_chart(&[], 0).into_string().contains("No job counts"));

        let p = |at_ms, messages_in, rejected_in| PeerSample {
            at_ms,
            counts: crate::metrics::PeerCounts { messages_in, rejected_in, ..Default::default() },
        };
        let svg = peer_chart(&[p(0, 0, 0), p(10_000, 5, 1)], p(20_000, 7, 1)).into_string();
        assert!(svg.contains("in 7") && svg.contains("rejected 1"), "{svg}");
        assert_eq!(svg.matches("class=\"bar-rej\"").count(), 2);
        assert!(peer_chart(&[], p(0, 0, 0)).into_string().contains("Collecting"));
    }
}
