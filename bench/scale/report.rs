//! What a run measured, and how it is printed: a Markdown table with one column per controller
//! and the ratio LBC ÷ cloudlb (every figure is lower-is-better, so a ratio above 1 means cloudlb
//! needs less), then one `FIGURE <controller> <name> <value>` line per figure for scripts.

use std::collections::BTreeMap;

use super::controllers::Kind;

/// The figures of one controller's run; a missing one timed out (or its phase could not run).
#[derive(Debug, Default)]
pub struct Figures {
    pub values: BTreeMap<&'static str, f64>,
    /// What went wrong (timeouts, failed creates), printed under the table.
    pub notes: Vec<String>,
}

impl Figures {
    pub fn set(&mut self, name: &'static str, value: Option<f64>) {
        if let Some(v) = value {
            self.values.insert(name, v);
        }
    }

    pub fn get(&self, name: &str) -> Option<f64> {
        self.values.get(name).copied()
    }
}

/// The `FIGURE` names, in print order (the list; scripts compare runs by them).
pub const FIGURES: [&str; 10] = [
    "hostname_p50_s",
    "hostname_p95_s",
    "all_hostnames_s",
    "calls_per_create",
    "node_join_calls_per_service",
    "node_join_s",
    "node_leave_calls_per_service",
    "delete_all_s",
    "steady_calls_per_min",
    "rss_mib",
];

/// Table rows: (figure name, label, decimals). Rows whose name is not in [`FIGURES`] are
/// table-only context.
fn rows(n: usize, first: usize, steady_s: u64) -> Vec<(&'static str, String, usize)> {
    vec![
        (
            "hostname_p50_s",
            format!("Service created → hostname, p50 of {first} sequential (s)"),
            3,
        ),
        (
            "hostname_p95_s",
            format!("Service created → hostname, p95 of {first} sequential (s)"),
            3,
        ),
        (
            "hostname_max_s",
            format!("Service created → hostname, max of {first} sequential (s)"),
            3,
        ),
        (
            "all_hostnames_s",
            format!(
                "all {n} have hostnames, from the first of the other {} created at once (s)",
                n - first
            ),
            1,
        ),
        (
            "calls_per_create",
            "AWS calls per create (until the controller is quiet)".into(),
            1,
        ),
        (
            "steady_calls_per_min",
            format!("AWS calls per minute, nothing changing ({steady_s} s)"),
            1,
        ),
        (
            "node_join_calls_per_service",
            "a node joins: AWS calls per Service".into(),
            2,
        ),
        (
            "node_join_s",
            "a node joins → in every target group (s)".into(),
            2,
        ),
        (
            "node_leave_calls_per_service",
            "a node leaves: AWS calls per Service".into(),
            2,
        ),
        (
            "node_leave_s",
            "a node leaves → out of every target group (s)".into(),
            2,
        ),
        (
            "delete_all_s",
            format!("delete all {n} → Services gone (s)"),
            1,
        ),
        ("delete_calls_per_service", "AWS calls per delete".into(), 1),
        (
            "leftovers",
            "load balancers + target groups left in its VPC after the deletes".into(),
            0,
        ),
        ("rss_mib", "controller peak RSS, VmHWM (MiB)".into(), 1),
    ]
}

fn cell(v: Option<f64>, decimals: usize) -> String {
    match v {
        Some(v) => format!("{v:.decimals$}"),
        None => "timeout".into(),
    }
}

/// LBC ÷ cloudlb, or a dash when it is undefined.
fn ratio(cloudlb: Option<f64>, lbc: Option<f64>) -> String {
    match (cloudlb, lbc) {
        (Some(c), Some(l)) if c == 0.0 && l == 0.0 => "=".into(),
        (Some(c), Some(l)) if c > 0.0 => format!("{:.2}", l / c),
        _ => "—".into(),
    }
}

/// Prints the side-by-side table (only the controllers that ran), the notes, and the FIGURE
/// lines.
pub fn print(header: &str, runs: &[(Kind, Figures)], n: usize, first: usize, steady_s: u64) {
    let of = |k: Kind| runs.iter().find(|(kind, _)| *kind == k).map(|(_, f)| f);
    let (cloudlb, lbc) = (of(Kind::Cloudlb), of(Kind::Lbc));
    println!();
    println!("{header}");
    println!();
    let mut head = String::from("| figure |");
    let mut rule = String::from("|---|");
    for (kind, _) in runs {
        head.push_str(&format!(" {} |", kind.name()));
        rule.push_str("---|");
    }
    if let (Some(_), Some(_)) = (cloudlb, lbc) {
        head.push_str(" lbc ÷ cloudlb |");
        rule.push_str("---|");
    }
    println!("{head}");
    println!("{rule}");
    for (name, label, decimals) in rows(n, first, steady_s) {
        let mut line = format!("| {label} |");
        for (_, f) in runs {
            line.push_str(&format!(" {} |", cell(f.get(name), decimals)));
        }
        if let (Some(c), Some(l)) = (cloudlb, lbc) {
            line.push_str(&format!(" {} |", ratio(c.get(name), l.get(name))));
        }
        println!("{line}");
    }
    for (kind, f) in runs {
        for note in &f.notes {
            println!("- {}: {note}", kind.name());
        }
    }
    println!();
    for (kind, f) in runs {
        for name in FIGURES {
            match f.get(name) {
                Some(v) => println!("FIGURE {} {name} {v:.4}", kind.name()),
                None => println!("FIGURE {} {name} timeout", kind.name()),
            }
        }
    }
}
