//! The operator CLI's tables: kubectl-style columns for counters, flows and targets, and
//! the explain report.

use std::fmt::Write as _;

use lb_common::Reason;

use super::{
    counters::CountersReport,
    explain::Explanation,
    flows::{FlowRow, ReturnRow},
    targets::FrontendTargets,
};

/// kubectl-style columns: left-aligned, three spaces apart, no trailing blanks.
pub fn render_table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let header: Vec<String> = headers.iter().map(|h| h.to_string()).collect();
    for row in std::iter::once(&header).chain(rows) {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            if i > 0 {
                line.push_str("   ");
            }
            line.push_str(cell);
            if i + 1 < row.len() {
                let pad = widths[i].saturating_sub(cell.chars().count());
                line.extend(std::iter::repeat_n(' ', pad));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

pub fn counters_table(r: &CountersReport) -> String {
    let mut rows: Vec<Vec<String>> = r
        .counters
        .iter()
        .map(|c| vec![c.reason.name().to_string(), c.count.to_string()])
        .collect();
    rows.push(vec!["total".into(), r.total.to_string()]);
    render_table(&["REASON", "PACKETS"], &rows)
}

/// The flows this node holds, then (when there are any) the tunnelled flows whose pods are
/// here, with the node each one's replies go back to.
pub fn flows_table(rows: &[FlowRow], returns: &[ReturnRow]) -> String {
    let rows: Vec<Vec<String>> = rows
        .iter()
        .map(|f| {
            let via = match (f.via, f.tunnel_to, f.snat_port) {
                ("tunnel", Some(node), _) => format!("tunnel to {node}"),
                ("snat", _, Some(port)) => format!("snat :{port}"),
                (via, _, _) => via.to_string(),
            };
            vec![
                f.client.to_string(),
                f.frontend.to_string(),
                f.proto.clone(),
                f.backend
                    .map(|b| b.to_string())
                    .unwrap_or_else(|| "<gone>".into()),
                f.backend_id.to_string(),
                f.service_id.to_string(),
                via,
                if f.closing { "closing" } else { "open" }.to_string(),
            ]
        })
        .collect();
    let mut out = render_table(
        &[
            "CLIENT",
            "FRONTEND",
            "PROTO",
            "BACKEND",
            "BACKEND-ID",
            "SLOT",
            "VIA",
            "STATE",
        ],
        &rows,
    );
    if !returns.is_empty() {
        let rows: Vec<Vec<String>> = returns
            .iter()
            .map(|r| {
                vec![
                    r.client.to_string(),
                    r.pod.to_string(),
                    r.proto.clone(),
                    format!("{} ({})", r.holder, r.encap),
                ]
            })
            .collect();
        out.push('\n');
        out.push_str(&render_table(
            &["TUNNELLED-IN CLIENT", "POD", "PROTO", "REPLIES BACK TO"],
            &rows,
        ));
    }
    out
}

pub fn targets_table(fes: &[FrontendTargets]) -> String {
    let mut rows = Vec::new();
    for fe in fes {
        let frontend = fe.label();
        let mut notes = Vec::new();
        if let Some(t) = fe.affinity_timeout_s {
            notes.push(format!("affinity {t}s"));
        }
        if fe.local_only {
            notes.push("local-only".to_string());
        }
        let notes = if notes.is_empty() {
            "-".into()
        } else {
            notes.join(",")
        };
        if fe.targets.is_empty() {
            rows.push(vec![
                frontend.clone(),
                fe.proto.clone(),
                fe.service_id.to_string(),
                "<none>".into(),
                "-".into(),
                "no-backends".into(),
                "-".into(),
                "-".into(),
                "-".into(),
                notes.clone(),
            ]);
        }
        for t in &fe.targets {
            rows.push(vec![
                frontend.clone(),
                fe.proto.clone(),
                fe.service_id.to_string(),
                t.backend
                    .map(|b| b.to_string())
                    .unwrap_or_else(|| "<empty slot>".into()),
                t.id.to_string(),
                t.state.to_string(),
                match (t.location, t.node) {
                    (Some(l), Some(node)) => format!("{l} {node}"),
                    (l, _) => l.unwrap_or("-").to_string(),
                },
                format!("{:.1}%", t.share_pct),
                t.flows.to_string(),
                notes.clone(),
            ]);
        }
    }
    render_table(
        &[
            "FRONTEND", "PROTO", "SLOT", "BACKEND", "ID", "STATE", "LOCATION", "SHARE", "FLOWS",
            "NOTES",
        ],
        &rows,
    )
}

/// `explain` as text: the packet, the verdict and reason, what came out and where it goes,
/// then the map entries read and written.
pub fn explain_table(e: &Explanation, ifname: &dyn Fn(u32) -> Option<String>) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "PROGRAM  {}", e.program);
    let _ = writeln!(out, "PACKET   {}", e.input);
    let reason = e.reason.map_or("none", Reason::name);
    let _ = writeln!(out, "VERDICT  {} ({reason}):{}", e.action, e.reason_text);
    match &e.rewritten {
        Some(d) => {
            let _ = writeln!(out, "OUTPUT   {d}");
        }
        None => out.push_str("OUTPUT   unchanged\n"),
    }
    if let Some(i) = e.out_ifindex {
        let _ = match ifname(i) {
            Some(name) => writeln!(out, "OUT      {name} (ifindex {i})"),
            None => writeln!(out, "OUT      ifindex {i}"),
        };
    }
    let mut rows: Vec<Vec<String>> = Vec::new();
    let mut add = |what: &str, map: &str, key: &str, value: String| {
        rows.push(vec![
            what.to_string(),
            map.to_string(),
            key.to_string(),
            value,
        ]);
    };
    for r in &e.read {
        add("read", r.map, &r.key, r.value.clone());
    }
    for c in &e.created {
        add("created", c.map, &c.key, c.value.clone());
    }
    for c in &e.changed {
        add(
            "changed",
            c.map,
            &c.key,
            format!("{} => {}", c.before, c.after),
        );
    }
    for r in &e.removed {
        add("removed", r.map, &r.key, r.value.clone());
    }
    if !rows.is_empty() {
        out.push('\n');
        out.push_str(&render_table(&["ENTRY", "MAP", "KEY", "VALUE"], &rows));
    }
    out
}

#[cfg(test)]
mod tests {
    use lb_common::maps::{MapDef, CONNTRACK, FRONTENDS, REVNAT};

    use super::*;
    use crate::inspect::{
        counters::Counter,
        explain::{Change, Entry},
        packet::Decoded,
        targets::{Target, TargetState},
    };

    #[test]
    fn tables_align_columns_without_trailing_blanks() {
        let t = render_table(
            &["A", "LONG-HEADER", "C"],
            &[
                vec!["xxxx".into(), "y".into(), "z".into()],
                vec!["1".into(), "2".into(), "".into()],
            ],
        );
        assert_eq!(
            t,
            "A      LONG-HEADER   C\nxxxx   y             z\n1      2\n"
        );
    }

    #[test]
    fn counters_table_lists_every_reason_and_total() {
        let r = CountersReport {
            counters: Reason::ALL
                .iter()
                .map(|&reason| Counter {
                    reason,
                    count: if reason == Reason::PassTtl { 3 } else { 0 },
                })
                .collect(),
            total: 3,
        };
        let t = counters_table(&r);
        assert_eq!(t.lines().count(), Reason::ALL.len() + 2);
        assert!(t
            .lines()
            .any(|l| l.split_whitespace().collect::<Vec<_>>() == ["pass_ttl", "3"]));
        assert_eq!(
            t.lines()
                .last()
                .unwrap()
                .split_whitespace()
                .collect::<Vec<_>>(),
            ["total", "3"]
        );
    }

    #[test]
    fn targets_table_has_a_row_per_backend_and_marks_empty_frontends() {
        let target = |id, state| Target {
            id,
            backend: Some(format!("10.244.1.{id}:8080").parse().unwrap()),
            state,
            location: Some("local"),
            node: None,
            ring_slots: 5,
            share_pct: 50.0,
            flows: 2,
        };
        let fes = vec![
            FrontendTargets {
                address: "*".into(),
                port: 30080,
                proto: "TCP".into(),
                service_id: 0,
                backend_count: 2,
                affinity_timeout_s: Some(10),
                local_only: false,
                targets: vec![
                    target(1, TargetState::Healthy),
                    target(2, TargetState::Draining),
                ],
            },
            FrontendTargets {
                address: "203.0.113.7".into(),
                port: 80,
                proto: "UDP".into(),
                service_id: 1,
                backend_count: 0,
                affinity_timeout_s: None,
                local_only: true,
                targets: vec![],
            },
        ];
        let t = targets_table(&fes);
        let lines: Vec<Vec<&str>> = t.lines().map(|l| l.split_whitespace().collect()).collect();
        assert_eq!(lines.len(), 4);
        assert_eq!(
            lines[1],
            [
                "*:30080",
                "TCP",
                "0",
                "10.244.1.1:8080",
                "1",
                "healthy",
                "local",
                "50.0%",
                "2",
                "affinity",
                "10s"
            ]
        );
        assert_eq!(lines[2][5], "draining");
        assert_eq!(
            lines[3][..6],
            ["203.0.113.7:80", "UDP", "1", "<none>", "-", "no-backends"]
        );
        assert_eq!(*lines[3].last().unwrap(), "local-only");
    }

    #[test]
    fn explain_table_shows_verdict_output_and_entries() {
        let input = crate::inspect::packet::Probe {
            from: "10.0.0.9:40000".parse().unwrap(),
            to: "192.168.1.10:30080".parse().unwrap(),
            proto: lb_common::PROTO_TCP,
            tcp_flags: crate::inspect::packet::TCP_SYN,
            src_mac: [2, 0, 0, 0, 0, 1],
            dst_mac: [2, 0, 0, 0, 0, 2],
            ttl: 64,
        }
        .frame();
        let e = Explanation {
            program: "lb_ingress (XDP, node NIC)",
            input: Decoded::decode(&input),
            verdict: 4,
            action: "XDP_REDIRECT",
            reason: Some(Reason::FwdLocal),
            reason_text: Reason::FwdLocal.describe(),
            output: input.clone(),
            rewritten: Some(Decoded::decode(&input)),
            out_ifindex: Some(7),
            back_out: false,
            read: vec![Entry {
                map: FRONTENDS::SPEC.name,
                key: "*:30080/TCP".into(),
                value: "service slot 0".into(),
            }],
            created: vec![Entry {
                map: CONNTRACK::SPEC.name,
                key: "k".into(),
                value: "v".into(),
            }],
            changed: vec![Change {
                map: REVNAT::SPEC.name,
                key: "k".into(),
                before: "a".into(),
                after: "b".into(),
            }],
            removed: vec![],
        };
        let t = explain_table(&e, &|i| (i == 7).then(|| "veth-p1".to_string()));
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines[0], "PROGRAM  lb_ingress (XDP, node NIC)");
        assert!(lines[1].starts_with("PACKET   02:00:00:00:00:01 -> 02:00:00:00:00:02, TCP 10.0.0.9:40000 -> 192.168.1.10:30080 ttl 64 [S]"), "{t}");
        assert!(
            lines[2].starts_with("VERDICT  XDP_REDIRECT (fwd_local): Request DNATed"),
            "{t}"
        );
        assert_eq!(lines[4], "OUT      veth-p1 (ifindex 7)");
        assert_eq!(
            lines[6].split_whitespace().collect::<Vec<_>>(),
            ["ENTRY", "MAP", "KEY", "VALUE"]
        );
        assert!(
            lines[7].starts_with("read      FRONTENDS   *:30080/TCP"),
            "{t}"
        );
        assert!(lines[9].ends_with("a => b"), "{t}");
        let json = serde_json::to_value(&e).unwrap();
        assert_eq!(json["reason"], "fwd_local");
        assert_eq!(json["out_ifindex"], 7);
    }
}
