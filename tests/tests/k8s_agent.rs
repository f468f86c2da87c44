//! `lb-user agent` against the real control plane (etcd, kube-apiserver, and the real
//! EndpointSlice controller in kube-controller-manager) in the lab's control namespace. The
//! test plays the kubelet: it creates Pods bound to the lab's nodes and reports them Running
//! and Ready with the addresses of the lab's pod namespaces, where real servers answer. The
//! agents authenticate with the token of deploy/'s ServiceAccount, so its RBAC is what they
//! run with.
//!
//! Needs root. Run: `cargo test -p lb-tests --release --test k8s_agent -- --test-threads=1`.

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, TcpStream};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Pod, Secret, Service};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::Client;
use lb_tests::kubelet;
use lb_tests::scenario::{Lab, LabSpec, PodId, LB_INGRESS_IP};
use lb_tests::topology::TopologySpec;
use serde_json::json;

const NS: &str = "ui";
const APP_LABEL: (&str, &str) = ("app.kubernetes.io/name", "ui");
/// How long a change may take to show up in traffic (API write, controller, agent, maps).
const CONVERGE: Duration = Duration::from_secs(20);

fn lab() -> Lab {
    let spec = LabSpec {
        topology: TopologySpec::uniform(2, 2),
        control_plane: true,
        quiet: true,
        ..LabSpec::default()
    };
    Lab::start(spec).expect("lab with a control plane starts")
}

/// Creates Service `ui/<name>` from the `spec` fields given (selector app=ui added).
fn create_service(lab: &Lab, name: &str, meta: serde_json::Value, spec: serde_json::Value) {
    let mut svc = json!({
        "metadata": {"name": name, "namespace": NS},
        "spec": {"selector": {APP_LABEL.0: APP_LABEL.1}}
    });
    for (k, v) in meta.as_object().expect("meta is an object") {
        svc["metadata"][k] = v.clone();
    }
    for (k, v) in spec.as_object().expect("spec is an object") {
        svc["spec"][k] = v.clone();
    }
    let svc: Service = serde_json::from_value(svc).expect("a valid Service");
    lab.kube(|c| async move {
        Api::<Service>::namespaced(c, NS)
            .create(&PostParams::default(), &svc)
            .await
    })
    .unwrap()
    .unwrap_or_else(|e| panic!("creating Service {name}: {e}"));
}

fn ensure_namespace(lab: &Lab) {
    lab.kube(|c| async move { kubelet::create_namespace(&c, NS).await })
        .unwrap()
        .expect("namespace ui");
}

/// Creates the Pod for lab pod `pod` on its node and reports it Ready with its address.
fn start_pod(lab: &Lab, pod: PodId) {
    let name = pod.to_string();
    let node = pod.node_name();
    let ip = lab.pod_addr(pod).unwrap();
    lab.kube(|c| async move {
        kubelet::create_pod(&c, NS, &name, &node, &[APP_LABEL]).await?;
        kubelet::set_pod_ready(&c, NS, &name, ip, true).await
    })
    .unwrap()
    .unwrap_or_else(|e| panic!("starting pod {pod}: {e}"));
}

fn delete_pod_now(lab: &Lab, pod: PodId) {
    let name = pod.to_string();
    lab.kube(|c| async move {
        Api::<Pod>::namespaced(c, NS)
            .delete(&name, &DeleteParams::default().grace_period(0))
            .await
    })
    .unwrap()
    .unwrap_or_else(|e| panic!("deleting pod {pod}: {e}"));
}

fn mark_terminating(lab: &Lab, pod: PodId) {
    let name = pod.to_string();
    lab.kube(|c| async move { kubelet::mark_terminating(&c, NS, &name).await })
        .unwrap()
        .unwrap_or_else(|e| panic!("marking pod {pod} terminating: {e}"));
}

/// The pods that answer `n` new connections to `addr:port` from the client.
fn answering(lab: &Lab, addr: Ipv4Addr, port: u16, n: usize) -> Result<BTreeSet<PodId>, String> {
    lab.http_flows(addr, port, n)
        .map(|answers| answers.iter().map(|a| a.pod).collect())
        .map_err(|e| e.to_string())
}

/// Polls until new connections to `addr:port` are answered by exactly `want`.
fn wait_for_pods(lab: &Lab, addr: Ipv4Addr, port: u16, want: &[PodId]) {
    let want: BTreeSet<PodId> = want.iter().copied().collect();
    let started = Instant::now();
    let mut last = Err("nothing tried yet".to_string());
    while started.elapsed() < CONVERGE {
        // Enough flows that Maglev reaches every backend with near certainty.
        last = answering(lab, addr, port, 8 * want.len().max(1));
        if last.as_ref() == Ok(&want) {
            return;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    panic!(
        "new connections to {addr}:{port} should reach {want:?} within {CONVERGE:?}; last saw {last:?}\n{}",
        agent_logs(lab)
    );
}

fn agent_logs(lab: &Lab) -> String {
    (0..lab.node_count())
        .filter_map(|i| lab.agent_log(i))
        .map(|p| {
            let text = std::fs::read_to_string(&p).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(30).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            format!("--- {} ---\n{}", p.display(), tail.join("\n"))
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn agent_log(lab: &Lab, node: usize) -> String {
    std::fs::read_to_string(lab.agent_log(node).expect("quiet lab keeps agent logs"))
        .unwrap_or_default()
}

fn node_ports(lab: &Lab, node: usize) -> BTreeSet<u16> {
    let v = lab.targets(node).expect("lb-user targets");
    v["frontends"]
        .as_array()
        .expect("targets prints {\"frontends\": [..]}")
        .iter()
        .map(|f| f["port"].as_u64().expect("port") as u16)
        .collect()
}

/// Polls `check` until it is true.
fn wait_until(what: &str, lab: &Lab, mut check: impl FnMut() -> bool) {
    let started = Instant::now();
    while started.elapsed() < CONVERGE {
        if check() {
            return;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    panic!("{what} within {CONVERGE:?}\n{}", agent_logs(lab));
}

#[test]
fn agent_follows_services_and_pods_through_the_real_endpointslice_controller() {
    let lab = lab();
    ensure_namespace(&lab);
    create_service(
        &lab,
        "ui-nlb",
        json!({}),
        json!({
            "type": "LoadBalancer",
            "ports": [{"name": "http", "port": 80, "targetPort": "http", "nodePort": 30080, "protocol": "TCP"}]
        }),
    );
    lab.kube(|c| async move {
        let status =
            json!({"status": {"loadBalancer": {"ingress": [{"ip": LB_INGRESS_IP.to_string()}]}}});
        Api::<Service>::namespaced(c, NS)
            .patch_status("ui-nlb", &PatchParams::default(), &Patch::Merge(&status))
            .await
    })
    .unwrap()
    .expect("LoadBalancer ingress IP");

    // 1 replica, on node 0.
    let (p00, p01, p10) = (PodId::new(0, 0), PodId::new(0, 1), PodId::new(1, 0));
    start_pod(&lab, p00);
    let n0 = lab.node_addr(0);
    let n1 = lab.node_addr(1);
    wait_for_pods(&lab, n0, 30080, &[p00]);
    // Counted from here: the polls above reached node 0's own stack (and were refused)
    // until the agent had the Service.
    let probe = lab.install_nft_probe(0).expect("nft probe on node 0");
    // Local delivery keeps the client's address; the LB ingress IP works too.
    let a = lab.http_get(n0, 30080).unwrap();
    assert_eq!(*a.client_seen.ip(), lab.client_addr());
    assert_eq!(a.peer, std::net::SocketAddrV4::new(n0, 30080));
    assert_eq!(lab.http_get(LB_INGRESS_IP, 80).unwrap().pod, p00);
    // Through node 1 the pod is remote: node 1 knows node 0 from its Node object, so it
    // tunnels the request there (IP-in-IP) and the pod sees the client's own socket, as in
    // ip mode; the reply still comes from node 1.
    let tunnelled = lab.counters(1).unwrap()["fwd_tunnel"];
    let b = lab.http_get(n1, 30080).unwrap();
    assert_eq!((b.pod, b.client_seen), (p00, b.local));
    assert_eq!(b.peer, std::net::SocketAddrV4::new(n1, 30080));
    assert!(
        lab.counters(1).unwrap()["fwd_tunnel"] >= tunnelled + 3,
        "node 1 did not tunnel the flow's SYN, ACK and request"
    );

    // 3 replicas over both nodes.
    start_pod(&lab, p01);
    start_pod(&lab, p10);
    wait_for_pods(&lab, n0, 30080, &[p00, p01, p10]);
    wait_for_pods(&lab, n1, 30080, &[p00, p01, p10]);

    // A keep-alive connection; then back to 1 replica: its pod terminates (kept for the
    // connection), another is deleted outright.
    let mut conn = lab.connect(n0, 30080).unwrap();
    let pinned = conn.get().unwrap().pod;
    let survivor = [p00, p01, p10].into_iter().find(|p| *p != pinned).unwrap();
    let deleted = [p00, p01, p10]
        .into_iter()
        .find(|p| *p != pinned && *p != survivor)
        .unwrap();
    mark_terminating(&lab, pinned);
    delete_pod_now(&lab, deleted);
    wait_for_pods(&lab, n0, 30080, &[survivor]);
    for _ in 0..5 {
        assert_eq!(
            conn.get().unwrap().pod,
            pinned,
            "the established connection keeps its terminating pod"
        );
    }

    // The accelerated flows never touched netfilter on node 0.
    let counts = probe.read().unwrap();
    assert!(
        counts.values().all(|&n| n == 0),
        "netfilter saw accelerated traffic: {counts:?}\nlbx counters on node 0: {:?}\n{}",
        lab.counters(0),
        agent_logs(&lab)
    );

    // The Service goes away: its frontends leave the maps.
    lab.kube(|c| async move {
        Api::<Service>::namespaced(c, NS)
            .delete("ui-nlb", &DeleteParams::default())
            .await
    })
    .unwrap()
    .expect("deleting the Service");
    wait_until(
        "the deleted Service's frontends should leave the maps",
        &lab,
        || node_ports(&lab, 0).is_empty() && node_ports(&lab, 1).is_empty(),
    );
}

#[test]
fn agent_keeps_forwarding_while_the_api_server_is_down_and_resyncs_after() {
    let mut lab = lab();
    ensure_namespace(&lab);
    create_service(
        &lab,
        "ui-nlb",
        json!({}),
        json!({
            "type": "NodePort",
            "ports": [{"name": "http", "port": 80, "targetPort": "http", "nodePort": 30080, "protocol": "TCP"}]
        }),
    );
    let (p00, p01, p10) = (PodId::new(0, 0), PodId::new(0, 1), PodId::new(1, 0));
    start_pod(&lab, p00);
    start_pod(&lab, p10);
    let n0 = lab.node_addr(0);
    wait_for_pods(&lab, n0, 30080, &[p00, p10]);
    let mut conn = lab.connect(n0, 30080).unwrap();
    let pinned = conn.get().unwrap().pod;

    lab.control_plane_mut().unwrap().stop_apiserver().unwrap();
    // Forwarding goes on with the last state: old connection and new ones.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(conn.get().unwrap().pod, pinned);
    assert_eq!(
        answering(&lab, n0, 30080, 16).unwrap(),
        BTreeSet::from([p00, p10])
    );
    for node in 0..2 {
        assert!(lab.agent_running(node), "agent {node} survives the outage");
    }

    // A long outage: the history the agents' watches would resume from is gone, so after the
    // restart every watch gets 410 Gone and relists (a full resync).
    let revision = lab
        .control_plane_mut()
        .unwrap()
        .expire_watch_history()
        .unwrap();
    eprintln!("etcd compacted at revision {revision}");
    lab.control_plane_mut().unwrap().start_apiserver().unwrap();
    // The agents follow changes made afterwards.
    let other = if pinned == p00 { p10 } else { p00 };
    start_pod(&lab, p01);
    delete_pod_now(&lab, other);
    wait_for_pods(&lab, n0, 30080, &[pinned, p01]);
    assert_eq!(conn.get().unwrap().pod, pinned);
    // The outage was noticed (and not fatal), and every expired watch relisted.
    for node in 0..2 {
        let log = agent_log(&lab, node);
        assert!(
            log.contains("watch of services failed"),
            "agent {node} should have noticed the outage:\n{log}"
        );
        for kind in ["services", "endpointslices", "nodes"] {
            wait_until(
                &format!("agent {node} relisting {kind} after 410 Gone"),
                &lab,
                || {
                    let log = agent_log(&lab, node);
                    log.contains(&format!("watch of {kind} expired (410 Gone"))
                        && log.contains(&format!("relisted {kind}: full resync"))
                },
            );
        }
    }
}

#[test]
fn agent_honours_traffic_policy_affinity_opt_outs_and_rbac() {
    let lab = lab();
    ensure_namespace(&lab);
    let (p00, p01, p10) = (PodId::new(0, 0), PodId::new(0, 1), PodId::new(1, 0));
    let n0 = lab.node_addr(0);
    let n1 = lab.node_addr(1);
    // externalTrafficPolicy Local with its health check port.
    create_service(
        &lab,
        "local",
        json!({}),
        json!({
            "type": "LoadBalancer", "externalTrafficPolicy": "Local", "healthCheckNodePort": 32081,
            "ports": [{"name": "http", "port": 80, "targetPort": "http", "nodePort": 30081}]
        }),
    );
    // sessionAffinity ClientIP.
    create_service(
        &lab,
        "sticky",
        json!({}),
        json!({
            "type": "NodePort", "sessionAffinity": "ClientIP",
            "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 600}},
            "ports": [{"name": "http", "port": 80, "targetPort": "http", "nodePort": 30085}]
        }),
    );
    // Left to kube-proxy: opted out, or another proxy's Service.
    create_service(
        &lab,
        "optout",
        json!({"annotations": {"lbx.io/accelerate": "false"}}),
        json!({"type": "NodePort", "ports": [{"port": 80, "targetPort": "http", "nodePort": 30082}]}),
    );
    create_service(
        &lab,
        "other-proxy",
        json!({"labels": {"service.kubernetes.io/service-proxy-name": "someone-else"}}),
        json!({"type": "NodePort", "ports": [{"port": 80, "targetPort": "http", "nodePort": 30083}]}),
    );
    // Valid for the API server, unsupported by lbx: skipped with a log line.
    create_service(
        &lab,
        "sctp",
        json!({}),
        json!({"type": "NodePort", "ports": [{"port": 80, "protocol": "SCTP", "targetPort": 8080, "nodePort": 30084}]}),
    );
    start_pod(&lab, p00);
    start_pod(&lab, p10);
    start_pod(&lab, p01);

    // Local policy: node 0 only uses its own pods and keeps the client IP; node 1 has its
    // own pod too. The health check port answers per node.
    wait_for_pods(&lab, n0, 30081, &[p00, p01]);
    wait_for_pods(&lab, n1, 30081, &[p10]);
    assert_eq!(
        *lab.http_get(n1, 30081).unwrap().client_seen.ip(),
        lab.client_addr()
    );
    let hc = |node: Ipv4Addr| health_check(&lab, node, 32081);
    wait_until(
        "node 0's health check should count 2 local endpoints",
        &lab,
        || hc(n0).is_some_and(|(code, body)| code == 200 && body["localEndpoints"] == 2),
    );
    delete_pod_now(&lab, p10);
    wait_until(
        "node 1's health check should answer 503 without local endpoints",
        &lab,
        || hc(n1).is_some_and(|(code, body)| code == 503 && body["localEndpoints"] == 0),
    );
    let (_, body) = hc(n0).unwrap();
    assert_eq!(body["service"], json!({"namespace": NS, "name": "local"}));

    // Affinity: every new connection from the client lands on the same pod.
    let sticky = answering(&lab, n0, 30085, 12).unwrap();
    assert_eq!(sticky.len(), 1, "ClientIP affinity: {sticky:?}");

    // Opted out and foreign Services are not in the maps; the SCTP one is skipped and said so.
    let ports = node_ports(&lab, 0);
    assert!(
        ports.contains(&30081) && ports.contains(&30085),
        "{ports:?}"
    );
    for p in [30082, 30083, 30084] {
        assert!(
            !ports.contains(&p),
            "port {p} must be left to kube-proxy: {ports:?}"
        );
    }
    wait_until("the agent should log why ui/sctp is skipped", &lab, || {
        let log = agent_log(&lab, 0);
        log.contains("ui/sctp") && log.contains("SCTP is not supported")
    });

    // The agent's ServiceAccount (deploy/) reads what it needs and nothing else.
    let token = {
        let mut cmd = lab.control_plane().unwrap().kubectl();
        cmd.args(["-n", "kube-system", "create", "token", "lbx-agent"]);
        let out = cmd.output().expect("kubectl create token");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    };
    let cp = lab.control_plane().unwrap();
    lab.kube(|_| async move {
        let client: Client = cp.client_with_token(&token).await.expect("token client");
        let services = Api::<Service>::all(client.clone())
            .list(&ListParams::default())
            .await;
        assert!(
            services.is_ok(),
            "the agent may list Services: {services:?}"
        );
        match Api::<Secret>::all(client.clone())
            .list(&ListParams::default())
            .await
        {
            Err(kube::Error::Api(status)) => assert_eq!(status.code, 403, "{status:?}"),
            other => panic!("the agent must be forbidden from reading Secrets: {other:?}"),
        }
        match Api::<Pod>::namespaced(client, NS)
            .list(&ListParams::default())
            .await
        {
            Err(kube::Error::Api(status)) => assert_eq!(status.code, 403, "{status:?}"),
            other => panic!("the agent must be forbidden from reading Pods: {other:?}"),
        }
    })
    .unwrap();
}

/// GET http://node:port/ from the client: (status code, JSON body).
fn health_check(lab: &Lab, node: Ipv4Addr, port: u16) -> Option<(u16, serde_json::Value)> {
    use std::io::{Read, Write};
    let text = lab
        .in_client(move || -> std::io::Result<String> {
            let mut s = TcpStream::connect_timeout(&(node, port).into(), Duration::from_secs(2))?;
            s.set_read_timeout(Some(Duration::from_secs(2)))?;
            s.write_all(b"GET /healthz HTTP/1.1\r\nHost: lb\r\nConnection: close\r\n\r\n")?;
            let mut out = String::new();
            s.read_to_string(&mut out)?;
            Ok(out)
        })
        .ok()?
        .ok()?;
    let code: u16 = text.split(' ').nth(1)?.parse().ok()?;
    let body = serde_json::from_str(text.split("\r\n\r\n").nth(1)?).ok()?;
    Some((code, body))
}

#[test]
fn deploy_kustomization_passes_server_side_dry_run() {
    let cp = lb_tests::controlplane::ControlPlane::start_isolated().expect("control plane");
    let deploy = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy");
    let out = cp
        .kubectl()
        .args(["apply", "--dry-run=server", "-k", deploy])
        .output()
        .expect("kubectl runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "kubectl apply --dry-run=server -k deploy/ failed: {}{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    for object in [
        "serviceaccount/lbx-agent",
        "clusterrole.rbac.authorization.k8s.io/lbx-agent",
        "clusterrolebinding.rbac.authorization.k8s.io/lbx-agent",
        "daemonset.apps/lbx-agent",
    ] {
        assert!(
            stdout.contains(&format!("{object} created (server dry run)")),
            "{object} missing from:\n{stdout}"
        );
    }
    // Dry run: nothing was created.
    let get = cp
        .kubectl()
        .args(["-n", "kube-system", "get", "daemonset", "lbx-agent"])
        .output()
        .unwrap();
    assert!(
        !get.status.success(),
        "the dry run must not create the DaemonSet"
    );
}
