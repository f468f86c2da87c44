//! Renderings of a [`LabReport`]: a plain-ASCII terminal table ([`table`]) and one
//! self-contained HTML5 page ([`html`]) with three inline SVG plots, each also available as a
//! standalone SVG document ([`svg_latency_cdf`], [`svg_sweep`], [`svg_cpu`]).
//!
//! Nothing here fetches anything: no scripts, fonts or images, and the SVG namespace is the
//! only URL in the output, so the page opens offline. Non-finite numbers print as `n/a` in
//! text and never reach SVG coordinates ([`Axis::map`] is total and clamps).

use std::fmt::Write as _;

use super::model::{LabReport, PathResult, PATHS};

/// Colour of a path in every plot (matplotlib's tab10, so the plots read like familiar ones).
pub fn path_colour(path: &str) -> &'static str {
    match path {
        "instance" => "#d62728",
        "xdp" => "#2ca02c",
        "ip" => "#1f77b4",
        p if p.starts_with("xdp-") => "#98df8a",
        _ => "#7f7f7f",
    }
}

/// The xdp path's remote mode, and the other one's path when it was measured too.
fn remote_modes(m: &super::model::Meta) -> String {
    match &m.other_remote_mode {
        Some(o) => format!(
            "{} (path xdp-{o}: the agents in --remote-mode {o})",
            m.remote_mode
        ),
        None => m.remote_mode.clone(),
    }
}

/// HTML/XML-escapes text for element content and double- or single-quoted attributes.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for ch in s.chars() {
        match ch {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            _ => out.push(ch),
        }
    }
    out
}

/// The paths present in the report: [`PATHS`] order first, then any others by name.
fn present_paths(r: &LabReport) -> Vec<(&str, &PathResult)> {
    let known = PATHS
        .iter()
        .filter_map(|p| r.paths.get(*p).map(|res| (*p, res)));
    let other = r.paths.iter().filter(|(k, _)| !PATHS.contains(&k.as_str()));
    known.chain(other.map(|(k, v)| (k.as_str(), v))).collect()
}

/// Fixed-point number, or `n/a` when it is NaN or infinite.
fn num(v: f64, decimals: usize) -> String {
    if v.is_finite() {
        format!("{v:.decimals$}")
    } else {
        "n/a".to_string()
    }
}

/// Compact tick label: 1, 2.5, 10, 1k, 2.5k, 1M.
fn short(v: f64) -> String {
    if !v.is_finite() {
        return "n/a".to_string();
    }
    let (x, suffix) = match v.abs() {
        a if a >= 1e6 => (v / 1e6, "M"),
        a if a >= 1e3 => (v / 1e3, "k"),
        _ => (v, ""),
    };
    let s = format!("{x:.2}");
    format!("{}{suffix}", s.trim_end_matches('0').trim_end_matches('.'))
}

/// "1 (local 1, remote 2)", or just the worst case when the split is unknown.
fn hops(p: &PathResult) -> String {
    let parts: Vec<String> = [("local", p.hops_local), ("remote", p.hops_remote)]
        .iter()
        .filter_map(|(k, v)| v.map(|v| format!("{k} {v}")))
        .collect();
    if parts.is_empty() {
        p.hops.to_string()
    } else {
        format!("{} ({})", p.hops, parts.join(", "))
    }
}

/// "yes (100.0%)" / "no (33.3%)".
fn client_ip(p: &PathResult) -> String {
    let yes = if p.client_ip_preserved { "yes" } else { "no" };
    let f = p.client_ip_seen_fraction * 100.0;
    let pct = if f.is_finite() {
        format!("{f:.1}%")
    } else {
        "n/a".into()
    };
    format!("{yes} ({pct})")
}

/// A table shared by both renderings; the first `text_cols` columns are left-aligned text,
/// the rest right-aligned numbers.
struct Table {
    headers: Vec<String>,
    rows: Vec<Vec<String>>,
    text_cols: usize,
}

impl Table {
    fn text(&self, indent: &str) -> String {
        let mut widths: Vec<usize> = self.headers.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(cell.chars().count());
            }
        }
        let line = |cells: &[String]| {
            let mut s = indent.to_string();
            for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
                let sep = if i == 0 { "" } else { "  " };
                if i < self.text_cols {
                    let _ = write!(s, "{sep}{cell:<w$}");
                } else {
                    let _ = write!(s, "{sep}{cell:>w$}");
                }
            }
            s.trim_end().to_string() + "\n"
        };
        let mut out = line(&self.headers);
        let rule: Vec<String> = widths.iter().map(|w| "-".repeat(*w)).collect();
        out += &line(&rule);
        for row in &self.rows {
            out += &line(row);
        }
        out
    }

    fn html(&self) -> String {
        let class = |i: usize| {
            if i < self.text_cols {
                ""
            } else {
                " class=\"num\""
            }
        };
        let mut out = String::from("<table>\n<thead><tr>");
        for (i, h) in self.headers.iter().enumerate() {
            let _ = write!(out, "<th{}>{}</th>", class(i), escape(h));
        }
        out += "</tr></thead>\n<tbody>\n";
        for row in &self.rows {
            out += "<tr>";
            for (i, c) in row.iter().enumerate() {
                let _ = write!(out, "<td{}>{}</td>", class(i), escape(c));
            }
            out += "</tr>\n";
        }
        out + "</tbody>\n</table>\n"
    }
}

fn headers(h: &[&str]) -> Vec<String> {
    h.iter().map(|s| s.to_string()).collect()
}

/// Throughput and latency, keep-alive and one connection per request.
fn load_table(r: &LabReport) -> Table {
    let rows = present_paths(r)
        .into_iter()
        .map(|(name, p)| {
            vec![
                name.to_string(),
                num(p.rps, 0),
                num(p.p50_us, 0),
                num(p.p90_us, 0),
                num(p.p99_us, 0),
                num(p.new_conn_rps, 0),
                num(p.new_conn_p99_us, 0),
                p.errors.to_string(),
            ]
        })
        .collect();
    let h = [
        "PATH",
        "RPS",
        "P50 US",
        "P90 US",
        "P99 US",
        "NEW CONN/S",
        "NEW P99 US",
        "ERRORS",
    ];
    Table {
        headers: headers(&h),
        rows,
        text_cols: 1,
    }
}

/// What the path does to a packet and what it costs.
fn cost_table(r: &LabReport) -> Table {
    let rows = present_paths(r)
        .into_iter()
        .map(|(name, p)| {
            vec![
                name.to_string(),
                hops(p),
                client_ip(p),
                num(p.cpu_us_per_req, 1),
                num(p.cpu_us_per_req_keepalive, 1),
                num(p.bpf_ns_per_req, 0),
                num(p.nf_rule_hits_per_req, 2),
                num(p.conntrack_per_req, 2),
            ]
        })
        .collect();
    let h = [
        "PATH",
        "HOPS",
        "CLIENT IP KEPT",
        "CPU US/REQ NEW",
        "CPU US/REQ KA",
        "BPF NS/REQ",
        "NF HITS/REQ",
        "CT/REQ",
    ];
    Table {
        headers: headers(&h),
        rows,
        text_cols: 3,
    }
}

/// Path names that occur in the sweep, [`PATHS`] order first.
fn sweep_paths(r: &LabReport) -> Vec<&str> {
    let mut names: Vec<&str> = PATHS.to_vec();
    for p in &r.sweep {
        if !names.contains(&p.path.as_str()) {
            names.push(&p.path);
        }
    }
    names.retain(|n| r.sweep.iter().any(|p| p.path == *n));
    names
}

/// One row per number of Services; new connections/s and p99 per path ("-" = not measured).
fn sweep_table(r: &LabReport) -> Table {
    let paths = sweep_paths(r);
    let mut counts: Vec<usize> = r.sweep.iter().map(|p| p.services).collect();
    counts.sort_unstable();
    counts.dedup();
    let rows = counts
        .iter()
        .map(|&n| {
            let mut row = vec![n.to_string()];
            for path in &paths {
                match r.sweep.iter().find(|p| p.services == n && p.path == *path) {
                    Some(p) => row.extend([num(p.new_conn_rps, 0), num(p.p99_us, 0)]),
                    None => row.extend(["-".to_string(), "-".to_string()]),
                }
            }
            row
        })
        .collect();
    let mut h = vec!["SERVICES".to_string()];
    for path in &paths {
        h.push(format!("{} NEW/S", path.to_uppercase()));
        h.push(format!("{} P99 US", path.to_uppercase()));
    }
    Table {
        headers: h,
        rows,
        text_cols: 0,
    }
}

/// The targets: verdict, name, measured value, target.
fn targets_table(r: &LabReport) -> Table {
    let rows = r
        .targets
        .iter()
        .map(|t| {
            let verdict = if t.met { "MET" } else { "NOT MET" };
            vec![
                verdict.into(),
                t.name.clone(),
                t.target.clone(),
                num(t.measured, 2),
            ]
        })
        .collect();
    Table {
        headers: headers(&["RESULT", "TARGET", "WANTED", "MEASURED"]),
        rows,
        text_cols: 3,
    }
}

/// The targets a load balancer registers for one path, like `describe-target-health`.
fn lb_targets_table(p: &PathResult) -> Table {
    let rows = p
        .targets
        .iter()
        .map(|t| {
            vec![
                format!("{}:{}", t.id, t.port),
                t.state.clone(),
                t.description.clone(),
            ]
        })
        .collect();
    Table {
        headers: headers(&["TARGET", "STATE", "DESCRIPTION"]),
        rows,
        text_cols: 3,
    }
}

/// The terminal report: per-path load and cost tables, the sweep, the targets and the
/// registered load-balancer targets of each path. Plain ASCII, no colours.
pub fn table(r: &LabReport) -> String {
    let mut out = format!(
        "Remote delivery on the xdp path (--remote-mode): {}\nLoad (keep-alive latency; NEW = one connection per request)\n",
        remote_modes(&r.meta)
    );
    out += &load_table(r).text("");
    out += "\nPath properties and cost (CPU: whole machine; KA = keep-alive)\n";
    out += &cost_table(r).text("");
    out += "\nNew connections/s and p99 by number of Services\n";
    out += &if r.sweep.is_empty() {
        "(no sweep)\n".into()
    } else {
        sweep_table(r).text("")
    };
    let errs: Vec<String> = sweep_paths(r)
        .iter()
        .map(|n| {
            (
                n,
                r.sweep
                    .iter()
                    .filter(|p| p.path == *n)
                    .map(|p| p.errors)
                    .sum::<u64>(),
            )
        })
        .filter(|(_, e)| *e > 0)
        .map(|(n, e)| format!("{n} {e}"))
        .collect();
    if !errs.is_empty() {
        let _ = writeln!(out, "sweep errors: {}", errs.join(", "));
    }
    out += "\nTargets\n";
    out += &if r.targets.is_empty() {
        "(none)\n".into()
    } else {
        targets_table(r).text("")
    };
    for (name, p) in present_paths(r) {
        let _ = writeln!(out, "\nLoad balancer targets, {name}: {}", p.description);
        out += &lb_targets_table(p).text("  ");
    }
    out
}

/// A plot axis mapping data values onto pixel positions `from..to`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Axis {
    lo: f64,
    hi: f64,
    log: bool,
    /// Tick spacing of a linear axis (0 for log).
    step: f64,
    from: f64,
    to: f64,
}

impl Axis {
    /// Linear axis over `lo..hi`, widened to round steps (1, 2 or 5 times a power of ten).
    pub fn linear(lo: f64, hi: f64, from: f64, to: f64) -> Axis {
        let (lo, hi) = if lo.is_finite() && hi.is_finite() {
            (lo, hi)
        } else {
            (0.0, 1.0)
        };
        let (lo, hi) = if hi > lo {
            (lo, hi)
        } else {
            (lo, lo + lo.abs().max(1.0))
        };
        let step = nice_step((hi - lo) / 5.0);
        let lo = (lo / step).floor() * step;
        let hi = (hi / step).ceil() * step;
        Axis {
            lo,
            hi,
            log: false,
            step,
            from,
            to,
        }
    }

    /// Log axis over `lo..hi` (both > 0), widened to whole decades.
    pub fn log(lo: f64, hi: f64, from: f64, to: f64) -> Axis {
        let lo = if lo.is_finite() && lo > 0.0 { lo } else { 1.0 };
        let hi = if hi.is_finite() && hi > lo { hi } else { lo };
        let lo = 10f64.powf(lo.log10().floor());
        let hi = 10f64.powf(hi.log10().ceil()).max(lo * 10.0);
        Axis {
            lo,
            hi,
            log: true,
            step: 0.0,
            from,
            to,
        }
    }

    /// Pixel position of `v`, clamped to the axis; always finite (NaN maps to the start).
    pub fn map(&self, v: f64) -> f64 {
        let t = if self.log {
            (v.max(self.lo).log10() - self.lo.log10()) / (self.hi.log10() - self.lo.log10())
        } else {
            (v - self.lo) / (self.hi - self.lo)
        };
        let t = if t.is_finite() {
            t.clamp(0.0, 1.0)
        } else {
            0.0
        };
        self.from + t * (self.to - self.from)
    }

    /// Tick values: every decade of a log axis (plus 2x and 5x when it spans at most two
    /// decades), about five round steps of a linear one.
    pub fn ticks(&self) -> Vec<f64> {
        if self.log {
            let (a, b) = (
                self.lo.log10().round() as i32,
                self.hi.log10().round() as i32,
            );
            let mults: &[f64] = if b - a <= 2 { &[1.0, 2.0, 5.0] } else { &[1.0] };
            let mut t: Vec<f64> = (a..=b)
                .flat_map(|e| mults.iter().map(move |m| m * 10f64.powi(e)))
                .filter(|v| *v <= self.hi * 1.000_001)
                .collect();
            t.dedup();
            t
        } else {
            let n = ((self.hi - self.lo) / self.step).round() as usize;
            (0..=n).map(|i| self.lo + i as f64 * self.step).collect()
        }
    }
}

/// The smallest of 1, 2, 5 times a power of ten that is >= `raw` (raw > 0).
fn nice_step(raw: f64) -> f64 {
    let raw = if raw.is_finite() && raw > 0.0 {
        raw
    } else {
        1.0
    };
    let base = 10f64.powf(raw.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * base)
        .find(|s| *s >= raw * 0.999_999)
        .unwrap_or(base)
}

/// SVG coordinate text; a non-finite value (which [`Axis::map`] never yields) becomes 0.
fn c(v: f64) -> String {
    if v.is_finite() {
        format!("{v:.1}")
    } else {
        "0".to_string()
    }
}

const W: f64 = 720.0;
const H: f64 = 400.0;
/// Plot area: left, right, top, bottom (the legend lives right of it).
const PLOT: (f64, f64, f64, f64) = (70.0, 560.0, 40.0, 345.0);

fn svg_open(title: &str) -> String {
    format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{W}\" height=\"{H}\" \
         viewBox=\"0 0 {W} {H}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <title>{t}</title>\n<rect width=\"{W}\" height=\"{H}\" fill=\"#ffffff\"/>\n\
         <text x=\"{x}\" y=\"24\" text-anchor=\"middle\" font-size=\"15\" \
         font-weight=\"bold\">{t}</text>\n",
        t = escape(title),
        x = c((PLOT.0 + PLOT.1) / 2.0),
    )
}

/// Frame, grid, ticks and axis titles. `x` is `None` for a categorical x axis.
fn axes(out: &mut String, x: Option<&Axis>, y: &Axis, x_title: &str, y_title: &str) {
    let (l, r, t, b) = PLOT;
    for v in x.map(|x| x.ticks()).unwrap_or_default() {
        let px = c(x.map_or(l, |x| x.map(v)));
        let _ = writeln!(
            out,
            "<line x1=\"{px}\" y1=\"{t}\" x2=\"{px}\" y2=\"{b}\" stroke=\"#e5e5e5\"/>\
             <text x=\"{px}\" y=\"{}\" text-anchor=\"middle\">{}</text>",
            b + 16.0,
            short(v)
        );
    }
    for v in y.ticks() {
        let py = c(y.map(v));
        let _ = writeln!(
            out,
            "<line x1=\"{l}\" y1=\"{py}\" x2=\"{r}\" y2=\"{py}\" stroke=\"#e5e5e5\"/>\
             <text x=\"{}\" y=\"{py}\" text-anchor=\"end\" dominant-baseline=\"middle\">{}</text>",
            l - 6.0,
            short(v)
        );
    }
    let _ = writeln!(
        out,
        "<rect x=\"{l}\" y=\"{t}\" width=\"{}\" height=\"{}\" fill=\"none\" stroke=\"#333333\"/>\n\
         <text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{}</text>\n\
         <text transform=\"translate(18,{}) rotate(-90)\" text-anchor=\"middle\">{}</text>",
        r - l,
        b - t,
        c((l + r) / 2.0),
        b + 38.0,
        escape(x_title),
        c((t + b) / 2.0),
        escape(y_title)
    );
}

/// Legend entries right of the plot: (colour, style, label); style "solid" or "dashed" draws a
/// line, anything else is the fill opacity of a swatch (for the bar chart).
fn legend(out: &mut String, entries: &[(&str, &str, &str)]) {
    for (i, (colour, style, label)) in entries.iter().enumerate() {
        let (x, y) = (PLOT.1 + 16.0, PLOT.2 + 10.0 + 20.0 * i as f64);
        let mark = match *style {
            "dashed" | "solid" => format!(
                "<line x1=\"{x}\" y1=\"{y}\" x2=\"{}\" y2=\"{y}\" stroke=\"{colour}\" \
                 stroke-width=\"2\"{}/>",
                x + 28.0,
                if *style == "dashed" {
                    " stroke-dasharray=\"6 4\""
                } else {
                    ""
                }
            ),
            opacity => format!(
                "<rect x=\"{x}\" y=\"{}\" width=\"28\" height=\"10\" fill=\"{colour}\" \
                 fill-opacity=\"{opacity}\"/>",
                y - 5.0
            ),
        };
        let _ = writeln!(
            out,
            "{mark}<text x=\"{}\" y=\"{y}\" dominant-baseline=\"middle\">{}</text>",
            x + 36.0,
            escape(label)
        );
    }
}

fn no_data(out: &mut String) {
    let _ = writeln!(
        out,
        "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\" fill=\"#666666\">no data</text>",
        c((PLOT.0 + PLOT.1) / 2.0),
        c((PLOT.2 + PLOT.3) / 2.0)
    );
}

fn finite_points(cdf: &[(f64, f64)]) -> Vec<(f64, f64)> {
    cdf.iter()
        .copied()
        .filter(|(x, y)| x.is_finite() && y.is_finite())
        .collect()
}

/// One CDF line: path, whether it is the new-connection load, its finite samples.
type CdfSeries<'a> = (&'a str, bool, Vec<(f64, f64)>);

/// Latency CDF per path, x log-scaled microseconds; keep-alive solid, new connection dashed.
pub fn svg_latency_cdf(r: &LabReport) -> String {
    let mut out = svg_open("Latency CDF per path");
    let series: Vec<CdfSeries> = present_paths(r)
        .into_iter()
        .flat_map(|(n, p)| {
            [
                (n, false, finite_points(&p.latency_cdf)),
                (n, true, finite_points(&p.new_conn_latency_cdf)),
            ]
        })
        .filter(|(_, _, pts)| !pts.is_empty())
        .collect();
    let xs = series
        .iter()
        .flat_map(|s| s.2.iter().map(|p| p.0))
        .filter(|x| *x > 0.0);
    let (min, max) = xs.fold((f64::INFINITY, 0.0f64), |(a, b), x| (a.min(x), b.max(x)));
    let x = Axis::log(min, max, PLOT.0, PLOT.1);
    let y = Axis::linear(0.0, 1.0, PLOT.3, PLOT.2);
    axes(
        &mut out,
        Some(&x),
        &y,
        "latency (microseconds, log scale)",
        "fraction of requests <= x",
    );
    if series.is_empty() {
        no_data(&mut out);
    }
    for (name, new_conn, pts) in &series {
        let points: Vec<String> = pts
            .iter()
            .map(|(a, b)| format!("{},{}", c(x.map(*a)), c(y.map(*b))))
            .collect();
        let _ =
            writeln!(
            out,
            "<polyline class=\"cdf {name} {}\" fill=\"none\" stroke=\"{}\" stroke-width=\"2\"{} \
             points=\"{}\"/>",
            if *new_conn { "new-conn" } else { "keep-alive" },
            path_colour(name),
            if *new_conn { " stroke-dasharray=\"6 4\"" } else { "" },
            points.join(" ")
        );
    }
    let mut entries: Vec<(&str, &str, &str)> = present_paths(r)
        .into_iter()
        .map(|(n, _)| (path_colour(n), "solid", n))
        .collect();
    entries.push(("#555555", "solid", "keep-alive"));
    entries.push(("#555555", "dashed", "new connection"));
    legend(&mut out, &entries);
    out + "</svg>\n"
}

/// New connections per second against the number of Services, one line per path.
pub fn svg_sweep(r: &LabReport) -> String {
    let mut out = svg_open("New connections/s vs number of Services");
    let pts: Vec<_> = r
        .sweep
        .iter()
        .filter(|p| p.new_conn_rps.is_finite())
        .collect();
    let (smin, smax) = pts.iter().fold((f64::INFINITY, 0.0f64), |(a, b), p| {
        (a.min(p.services as f64), b.max(p.services as f64))
    });
    let log = smin >= 1.0 && smax / smin >= 10.0;
    let x = if log {
        Axis::log(smin, smax, PLOT.0, PLOT.1)
    } else {
        Axis::linear(smin.min(smax), smax, PLOT.0, PLOT.1)
    };
    let ymax = pts.iter().map(|p| p.new_conn_rps).fold(0.0, f64::max);
    let y = Axis::linear(0.0, ymax, PLOT.3, PLOT.2);
    let x_title = if log {
        "Services (log scale)"
    } else {
        "Services"
    };
    axes(
        &mut out,
        Some(&x),
        &y,
        x_title,
        "new connections per second",
    );
    if pts.is_empty() {
        no_data(&mut out);
    }
    let paths = sweep_paths(r);
    for name in &paths {
        let mut line: Vec<_> = pts.iter().filter(|p| p.path == *name).collect();
        line.sort_by_key(|p| p.services);
        let colour = path_colour(name);
        let coords: Vec<(String, String)> = line
            .iter()
            .map(|p| (c(x.map(p.services as f64)), c(y.map(p.new_conn_rps))))
            .collect();
        let points: Vec<String> = coords.iter().map(|(a, b)| format!("{a},{b}")).collect();
        let _ = writeln!(
            out,
            "<polyline class=\"sweep {name}\" fill=\"none\" stroke=\"{colour}\" stroke-width=\"2\" \
             points=\"{}\"/>",
            points.join(" ")
        );
        for (p, (cx, cy)) in line.iter().zip(&coords) {
            let _ = writeln!(
                out,
                "<circle cx=\"{cx}\" cy=\"{cy}\" r=\"3.5\" fill=\"{colour}\"><title>{}: {} Services, \
                 {} new conn/s, p99 {} us</title></circle>",
                escape(name),
                p.services,
                num(p.new_conn_rps, 0),
                num(p.p99_us, 0)
            );
        }
    }
    let entries: Vec<_> = paths
        .iter()
        .map(|n| (path_colour(n), "solid", *n))
        .collect();
    legend(&mut out, &entries);
    out + "</svg>\n"
}

/// Whole-machine CPU microseconds per request per path: new connection and keep-alive bars.
pub fn svg_cpu(r: &LabReport) -> String {
    let mut out = svg_open("CPU time per request");
    let paths = present_paths(r);
    let vals = paths
        .iter()
        .flat_map(|(_, p)| [p.cpu_us_per_req, p.cpu_us_per_req_keepalive]);
    let ymax = vals.filter(|v| v.is_finite()).fold(0.0, f64::max);
    let y = Axis::linear(0.0, ymax, PLOT.3, PLOT.2);
    axes(
        &mut out,
        None,
        &y,
        "path",
        "CPU microseconds per request (all cores)",
    );
    if paths.is_empty() {
        no_data(&mut out);
    }
    let group = (PLOT.1 - PLOT.0) / paths.len().max(1) as f64;
    let bar = group * 0.3;
    for (i, (name, p)) in paths.iter().enumerate() {
        let mid = PLOT.0 + group * (i as f64 + 0.5);
        let _ = writeln!(
            out,
            "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{}</text>",
            c(mid),
            PLOT.3 + 16.0,
            escape(name)
        );
        for (k, (v, opacity)) in [
            (p.cpu_us_per_req, "1"),
            (p.cpu_us_per_req_keepalive, "0.45"),
        ]
        .into_iter()
        .enumerate()
        {
            let bx = mid - bar + k as f64 * bar;
            let top = if v.is_finite() { y.map(v) } else { PLOT.3 };
            let _ = writeln!(
                out,
                "<rect x=\"{}\" y=\"{}\" width=\"{}\" height=\"{}\" fill=\"{}\" \
                 fill-opacity=\"{opacity}\"/><text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{}</text>",
                c(bx),
                c(top),
                c(bar - 2.0),
                c(PLOT.3 - top),
                path_colour(name),
                c(bx + bar / 2.0 - 1.0),
                c(top - 5.0),
                num(v, 1)
            );
        }
    }
    legend(
        &mut out,
        &[
            ("#555555", "1", "new connection"),
            ("#555555", "0.45", "keep-alive"),
        ],
    );
    out + "</svg>\n"
}

const CSS: &str = "body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;\
padding:0 1em;color:#222}table{border-collapse:collapse;margin:.5em 0 1.5em}\
th,td{border:1px solid #ccc;padding:3px 8px;text-align:left}th{background:#f3f3f3}\
td.num,th.num{text-align:right;font-variant-numeric:tabular-nums}\
code{background:#f3f3f3;padding:1px 4px}.met{color:#1a7f37;font-weight:bold}\
.notmet{color:#c62828;font-weight:bold}svg{max-width:100%;height:auto;display:block}";

/// The whole report as one self-contained HTML5 page (inline CSS and SVG, nothing external).
pub fn html(r: &LabReport) -> String {
    let m = &r.meta;
    let title = "lbx lab: instance vs xdp vs ip";
    let mut out = format!(
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <title>{title}</title>\n<style>{CSS}</style>\n</head>\n<body>\n<h1>{title}</h1>\n\
         <h2>Setup</h2>\n<table>\n"
    );
    let meta = [
        ("Command", format!("<code>{}</code>", escape(&m.command))),
        ("Started", escape(&m.started)),
        ("Kernel", escape(&m.kernel)),
        ("CPUs", m.cpus.to_string()),
        ("Nodes", m.nodes.to_string()),
        ("Replicas", m.replicas.to_string()),
        ("Services", m.services.to_string()),
        ("kube-proxy mode", escape(&m.kube_proxy_mode)),
        ("lbx remote delivery (xdp path)", escape(&remote_modes(m))),
        ("Kubernetes", escape(&m.kubernetes_version)),
        (
            "Duration per measurement",
            format!("{} s", num(m.duration_s, 1)),
        ),
        ("Connections", m.connections.to_string()),
    ];
    for (k, v) in meta {
        let _ = writeln!(out, "<tr><th>{k}</th><td>{v}</td></tr>");
    }
    out += "</table>\n";
    if !m.notes.is_empty() {
        out += "<ul>\n";
        for n in &m.notes {
            let _ = writeln!(out, "<li>{}</li>", escape(n));
        }
        out += "</ul>\n";
    }
    out += "<h2>Load</h2>\n<p>Keep-alive latency; NEW = one connection per request.</p>\n";
    out += &load_table(r).html();
    out += &svg_latency_cdf(r);
    out += "<h2>Path properties and cost</h2>\n<p>CPU: whole machine; KA = keep-alive.</p>\n";
    out += &cost_table(r).html();
    out += &svg_cpu(r);
    out += "<h2>Scaling with the number of Services</h2>\n";
    out += &if r.sweep.is_empty() {
        "<p>No sweep.</p>\n".into()
    } else {
        sweep_table(r).html()
    };
    out += &svg_sweep(r);
    out += "<h2>Targets</h2>\n";
    if r.targets.is_empty() {
        out += "<p>None.</p>\n";
    } else {
        let t = targets_table(r).html();
        out += &t
            .replace("<td>MET</td>", "<td class=\"met\">MET</td>")
            .replace("<td>NOT MET</td>", "<td class=\"notmet\">NOT MET</td>");
    }
    out += "<h2>Load balancer targets</h2>\n";
    for (name, p) in present_paths(r) {
        let _ = writeln!(out, "<h3>{}: {}</h3>", escape(name), escape(&p.description));
        out += &lb_targets_table(p).html();
    }
    out + "</body>\n</html>\n"
}

#[cfg(test)]
mod tests {
    use super::super::model::{LbTarget, Meta, SweepPoint, TargetCheck};
    use super::*;

    /// A log-normal-ish CDF of `n` points with median `median` microseconds.
    fn cdf(n: usize, median: f64) -> Vec<(f64, f64)> {
        (1..=n)
            .map(|i| {
                (
                    median * (4.0 * (i as f64 / n as f64 - 0.5)).exp(),
                    i as f64 / n as f64,
                )
            })
            .collect()
    }

    fn path(desc: &str, rps: f64, hops: (u32, Option<u32>, Option<u32>), kept: f64) -> PathResult {
        PathResult {
            description: desc.into(),
            rps,
            // 4 connections: p50 = 4 / rps seconds.
            p50_us: 4.0e6 / rps,
            p90_us: 6.0e6 / rps,
            p99_us: 1.2e7 / rps,
            new_conn_rps: rps / 4.0,
            new_conn_p99_us: 5.0e7 / rps,
            hops: hops.0,
            hops_local: hops.1,
            hops_remote: hops.2,
            client_ip_preserved: kept == 1.0,
            client_ip_seen_fraction: kept,
            cpu_us_per_req: 4.0e5 / rps,
            cpu_us_per_req_keepalive: 1.0e5 / rps,
            bpf_ns_per_req: if desc.contains("XDP") { 310.0 } else { 0.0 },
            nf_rule_hits_per_req: 7.25,
            conntrack_per_req: 1.0,
            targets: vec![LbTarget {
                id: "10.77.0.2".into(),
                port: 31080,
                state: "healthy".into(),
                description: "node n0 InternalIP".into(),
            }],
            latency_cdf: cdf(40 + rps as usize % 7, 4.0e6 / rps),
            new_conn_latency_cdf: cdf(25, 1.6e7 / rps),
            ..Default::default()
        }
    }

    fn report() -> LabReport {
        let mut r = LabReport {
            meta: Meta {
                command: "cargo xtask lab compare --json out.json".into(),
                kernel: "6.18.0".into(),
                cpus: 2,
                nodes: 3,
                remote_mode: "tunnel".into(),
                notes: vec!["<b>&\"".into()],
                ..Default::default()
            },
            ..Default::default()
        };
        r.paths.insert(
            "instance".into(),
            path(
                "nodeIP:nodePort via kube-proxy",
                20000.0,
                (2, Some(1), Some(2)),
                1.0 / 3.0,
            ),
        );
        r.paths.insert(
            "xdp".into(),
            path(
                "nodeIP:nodePort via lbx XDP",
                41234.6,
                (1, Some(1), None),
                1.0,
            ),
        );
        r.paths.insert(
            "ip".into(),
            path("podIP directly", 45000.0, (0, None, None), 1.0),
        );
        for (n, f) in [(1, 1.0), (1000, 0.8), (10000, 0.3)] {
            for (p, base) in [("instance", 5000.0), ("xdp", 10300.0), ("ip", 11000.0)] {
                let scale = if p == "instance" { f } else { 1.0 };
                r.sweep.push(SweepPoint {
                    services: n,
                    path: p.into(),
                    new_conn_rps: base * scale,
                    p99_us: 900.0,
                    errors: 0,
                    ..SweepPoint::default()
                });
            }
        }
        r.targets = vec![
            TargetCheck {
                name: "xdp new_conn_rps / instance at 10000 services".into(),
                measured: 6.87,
                target: ">= 2.0".into(),
                met: true,
            },
            TargetCheck {
                name: "xdp p99 / ip p99".into(),
                measured: 1.31,
                target: "<= 1.1".into(),
                met: false,
            },
        ];
        r
    }

    /// Tag balance of an XML (or, with `void`, HTML) document: every element closed in order,
    /// one root, every `&` an entity, even quote counts inside tags.
    fn check_xml(doc: &str, void: &[&str]) -> Result<(), String> {
        for (i, _) in doc.match_indices('&') {
            let ok = ["&amp;", "&lt;", "&gt;", "&quot;", "&#39;"]
                .iter()
                .any(|e| doc[i..].starts_with(e));
            if !ok {
                return Err(format!("bare & at {i}"));
            }
        }
        let (mut stack, mut roots, mut rest) = (Vec::<String>::new(), 0, doc);
        while let Some(i) = rest.find('<') {
            if stack.is_empty() && !rest[..i].trim().is_empty() {
                return Err(format!("text outside the root: {:?}", &rest[..i]));
            }
            rest = &rest[i..];
            let end = rest.find('>').ok_or("unterminated tag")?;
            let tag = &rest[1..end];
            rest = &rest[end + 1..];
            if tag.starts_with('!') || tag.starts_with('?') {
                continue;
            }
            if tag.contains('<') || tag.matches('"').count() % 2 != 0 {
                return Err(format!("malformed tag <{tag}>"));
            }
            if let Some(name) = tag.strip_prefix('/') {
                match stack.pop() {
                    Some(open) if open == name.trim() => roots += stack.is_empty() as usize,
                    other => return Err(format!("</{name}> closes {other:?}")),
                }
            } else {
                let name = tag
                    .split(|ch: char| ch.is_whitespace() || ch == '/')
                    .next()
                    .unwrap_or("");
                if name.is_empty() {
                    return Err(format!("nameless tag <{tag}>"));
                }
                if tag.ends_with('/') || void.contains(&name) {
                    roots += stack.is_empty() as usize;
                } else {
                    stack.push(name.to_string());
                }
            }
        }
        match (stack.is_empty(), roots, rest.trim().is_empty()) {
            (true, 1, true) => Ok(()),
            _ => Err(format!("open {stack:?}, {roots} roots, trailing {rest:?}")),
        }
    }

    /// Point counts of every `<polyline ... points="...">` in order.
    fn polyline_lengths(svg: &str) -> Vec<usize> {
        svg.split("<polyline")
            .skip(1)
            .map(|s| {
                let pts = s
                    .split("points=\"")
                    .nth(1)
                    .unwrap()
                    .split('"')
                    .next()
                    .unwrap();
                pts.split_whitespace().count()
            })
            .collect()
    }

    fn svgs(r: &LabReport) -> [String; 3] {
        [svg_latency_cdf(r), svg_sweep(r), svg_cpu(r)]
    }

    #[test]
    fn table_shows_every_path_and_number() {
        let t = table(&report());
        for s in [
            "instance",
            "xdp",
            "ip ",
            "41235",
            "10309",
            "1 (local 1)",
            "2 (local 1, remote 2)",
            "no (33.3%)",
            "yes (100.0%)",
            "Remote delivery on the xdp path (--remote-mode): tunnel",
            "310",
            "7.25",
            "20.0",
            "10000",
            "NOT MET",
            "6.87",
            "10.77.0.2:31080  healthy  node n0 InternalIP",
        ] {
            assert!(t.contains(s), "table lacks {s:?}:\n{t}");
        }
        let rows: Vec<&str> = t
            .lines()
            .filter(|l| l.starts_with("xdp") || l.starts_with("ip ") || l.starts_with("instance"))
            .collect();
        assert_eq!(rows.len(), 6, "two tables of three paths:\n{t}");
        assert!(
            rows[0].starts_with("instance") && rows[1].starts_with("xdp"),
            "PATHS order:\n{t}"
        );
        assert!(
            t.lines().all(|l| l.len() <= 120),
            "line over 120 chars:\n{t}"
        );
        assert!(t.is_ascii());
    }

    #[test]
    fn html_is_self_contained_and_well_formed() {
        let r = report();
        let h = html(&r);
        assert_eq!(h.matches("<svg").count(), 3);
        let ns = "xmlns=\"http://www.w3.org/2000/svg\"";
        assert_eq!(h.matches("http://").count(), h.matches(ns).count());
        assert!(!h.contains("https://") && !h.contains("<script") && !h.contains("src="));
        check_xml(&h, &["meta"]).unwrap();
        for s in svgs(&r) {
            assert!(s.starts_with(&format!("<svg {ns}")));
            check_xml(&s, &[]).unwrap_or_else(|e| panic!("{e}\n{s}"));
            assert!(h.contains(&s), "html embeds the standalone svg");
        }
        assert!(h.contains("&lt;b&gt;&amp;&quot;") && !h.contains("<b>&\""));
        assert!(h.contains("class=\"notmet\">NOT MET"));
    }

    #[test]
    fn polylines_have_one_point_per_sample() {
        let r = report();
        let want: Vec<usize> = PATHS
            .iter()
            .flat_map(|p| {
                let p = &r.paths[*p];
                [p.latency_cdf.len(), p.new_conn_latency_cdf.len()]
            })
            .collect();
        assert_eq!(polyline_lengths(&svg_latency_cdf(&r)), want);
        assert_eq!(polyline_lengths(&svg_sweep(&r)), vec![3, 3, 3]);
        assert!(svg_sweep(&r).contains("Services (log scale)"));
    }

    #[test]
    fn non_finite_and_empty_data_never_leak() {
        let mut r = report();
        let x = r.paths.get_mut("xdp").unwrap();
        (x.p99_us, x.rps, x.cpu_us_per_req, x.client_ip_seen_fraction) =
            (f64::NAN, f64::INFINITY, f64::NAN, f64::NAN);
        x.new_conn_latency_cdf.push((f64::NAN, 0.5));
        x.latency_cdf.push((f64::INFINITY, 1.0));
        r.paths.get_mut("ip").unwrap().latency_cdf.clear();
        r.sweep[0].new_conn_rps = f64::NAN;
        r.targets[0].measured = f64::NEG_INFINITY;
        for out in [table(&r), html(&r)].into_iter().chain(svgs(&r)) {
            assert!(!out.contains("NaN") && !out.contains("inf"), "{out}");
        }
        for s in svgs(&r) {
            check_xml(&s, &[]).unwrap();
        }
        // ip's keep-alive CDF is gone, the non-finite samples are dropped.
        let lens = polyline_lengths(&svg_latency_cdf(&r));
        assert_eq!(lens.len(), 5);
        assert_eq!(lens[2..4], [r.paths["xdp"].latency_cdf.len() - 1, 25]);

        let empty = LabReport::default();
        for s in svgs(&empty) {
            assert!(s.contains("no data"), "{s}");
            check_xml(&s, &[]).unwrap();
        }
        check_xml(&html(&empty), &["meta"]).unwrap();
        assert!(table(&empty).contains("(no sweep)"));
    }

    #[test]
    fn log_axis_ticks_every_decade() {
        let a = Axis::log(1.0, 10000.0, 0.0, 400.0);
        assert_eq!(a.ticks(), vec![1.0, 10.0, 100.0, 1000.0, 10000.0]);
        let px: Vec<f64> = a.ticks().iter().map(|v| a.map(*v)).collect();
        for (p, want) in px.iter().zip([0.0, 100.0, 200.0, 300.0, 400.0]) {
            assert!((p - want).abs() < 1e-9, "{px:?}");
        }
        assert_eq!(
            a.ticks().iter().map(|v| short(*v)).collect::<Vec<_>>(),
            ["1", "10", "100", "1k", "10k"]
        );
        assert_eq!(Axis::log(3.0, 7000.0, 0.0, 1.0), a.with_range(0.0, 1.0));
        assert_eq!(
            Axis::log(20.0, 800.0, 0.0, 1.0).ticks(),
            [10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0]
        );
        assert_eq!(a.map(0.0), 0.0);
        assert_eq!(a.map(f64::NAN), 0.0);
        assert_eq!(
            Axis::linear(0.0, 9300.0, 0.0, 1.0).ticks(),
            [0.0, 2000.0, 4000.0, 6000.0, 8000.0, 10000.0]
        );
    }

    impl Axis {
        fn with_range(mut self, from: f64, to: f64) -> Axis {
            (self.from, self.to) = (from, to);
            self
        }
    }
}
