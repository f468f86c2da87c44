//! The real control-plane fixture: etcd + kube-apiserver + kube-controller-manager in a
//! network namespace, and the lab's control namespace. Needs root, the binaries of
//! `cargo xtask k8s-build` and `cargo xtask setup` (or LBX_K8S_BIN_DIR / LBX_ETCD_BIN), and
//! runs serially (`--test-threads=1`) like every namespace test.

use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use k8s_openapi::api::{
    core::v1::{ConfigMap, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    api::{ListParams, PostParams},
    Api, Client,
};
use lb_tests::{
    controlplane::{Binaries, ControlPlane, ControlPlaneError, APISERVER_PORT},
    kubelet::{self, wait_for},
    netns,
    topology::{pod_addr_of, Topology, TopologySpec, CONTROL_ADDR},
};
use serde_json::json;

/// Generous: the controller manager batches EndpointSlice updates (1 s by default).
const SLICE_TIMEOUT: Duration = Duration::from_secs(30);

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

fn start_isolated() -> ControlPlane {
    let started = Instant::now();
    let cp = ControlPlane::start_isolated().unwrap_or_else(|e| panic!("start control plane: {e}"));
    eprintln!(
        "control plane up in {:.1?} (namespace {})",
        started.elapsed(),
        cp.netns()
    );
    cp
}

/// A NodePort Service selecting `app=<name>`: port 80 to the pods' port named `http`.
async fn create_service(client: &Client, ns: &str, name: &str) -> Service {
    let svc: Service = serde_json::from_value(json!({
        "metadata": { "name": name, "namespace": ns },
        "spec": {
            "type": "NodePort",
            "selector": { "app": name },
            "ports": [{ "name": "web", "port": 80, "targetPort": "http", "protocol": "TCP" }],
        },
    }))
    .expect("valid Service");
    Api::<Service>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &svc)
        .await
        .expect("create Service")
}

/// What the tests compare: one endpoint of a slice.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Ep {
    address: String,
    node: String,
    ready: bool,
    serving: bool,
    terminating: bool,
}

/// The endpoints of every slice of Service `ns/name`, by address, plus the slices' ports.
async fn slice_state(
    client: &Client,
    ns: &str,
    name: &str,
) -> Result<(BTreeMap<String, Ep>, Vec<(String, i32)>), kube::Error> {
    let slices = Api::<EndpointSlice>::namespaced(client.clone(), ns)
        .list(&ListParams::default().labels(&format!("kubernetes.io/service-name={name}")))
        .await?;
    let mut eps = BTreeMap::new();
    let mut ports = Vec::new();
    for slice in slices {
        assert_eq!(slice.address_type, "IPv4");
        for p in slice.ports.unwrap_or_default() {
            ports.push((p.name.unwrap_or_default(), p.port.unwrap_or_default()));
        }
        for ep in slice.endpoints {
            let c = ep.conditions.unwrap_or_default();
            for address in ep.addresses {
                eps.insert(
                    address.clone(),
                    Ep {
                        address,
                        node: ep.node_name.clone().unwrap_or_default(),
                        ready: c.ready.unwrap_or(false),
                        serving: c.serving.unwrap_or(false),
                        terminating: c.terminating.unwrap_or(false),
                    },
                );
            }
        }
    }
    ports.sort();
    ports.dedup();
    Ok((eps, ports))
}

/// Waits until the slices of `ns/name` hold exactly `want` (by address).
async fn wait_for_slices(client: &Client, ns: &str, name: &str, want: &[Ep]) {
    let want: BTreeMap<String, Ep> = want
        .iter()
        .map(|e| (e.address.clone(), e.clone()))
        .collect();
    // The named targetPort resolves to the pods' port 8080 under the Service port's name.
    let want_ports = [("web".to_owned(), 8080)];
    let start = Instant::now();
    let mut last = None;
    while start.elapsed() < SLICE_TIMEOUT {
        match slice_state(client, ns, name).await {
            Ok((eps, ports)) if eps == want && ports == want_ports => return,
            Ok(seen) => last = Some(Ok(seen)),
            Err(e) => last = Some(Err(e.to_string())),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!(
        "EndpointSlices of {ns}/{name} did not become {want:?} with ports {want_ports:?} \
         within {SLICE_TIMEOUT:?}; last seen: {last:?}"
    );
}

fn ep(address: Ipv4Addr, node: &str, ready: bool, serving: bool, terminating: bool) -> Ep {
    Ep {
        address: address.to_string(),
        node: node.to_owned(),
        ready,
        serving,
        terminating,
    }
}

/// The real EndpointSlice controller turns pod status written by the test (the kubelet's
/// part) into slices: readiness, node names, the named target port, and the terminating
/// and serving conditions of a pod being deleted.
#[test]
fn endpointslice_controller_follows_pod_status() {
    let cp = start_isolated();
    runtime().block_on(async {
        let client = cp.kube_client().await.expect("client");
        let ns = "shop";
        kubelet::create_namespace(&client, ns)
            .await
            .expect("namespace");
        let nodes = [
            ("node-0", Ipv4Addr::new(10, 77, 0, 10)),
            ("node-1", Ipv4Addr::new(10, 77, 0, 11)),
        ];
        for (name, ip) in nodes {
            let node = kubelet::create_node(&client, name, ip).await.expect("node");
            let status = node.status.expect("node status");
            let ready = status.conditions.unwrap_or_default();
            assert!(ready
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True"));
            let addrs = status.addresses.unwrap_or_default();
            assert!(addrs
                .iter()
                .any(|a| a.type_ == "InternalIP" && a.address == ip.to_string()));
        }
        let svc = create_service(&client, ns, "web").await;
        let spec = svc.spec.expect("spec");
        let cluster_ip: Ipv4Addr = spec.cluster_ip.expect("clusterIP").parse().expect("IPv4");
        assert_eq!(
            cluster_ip.octets()[..2],
            [10, 96],
            "clusterIP from 10.96.0.0/16"
        );
        let node_port = spec.ports.expect("ports")[0].node_port.expect("nodePort");
        assert!((30000..=32767).contains(&node_port), "nodePort {node_port}");

        let pod_ips = [pod_addr_of(0, 0), pod_addr_of(1, 0)];
        assert_eq!(
            pod_ips,
            [Ipv4Addr::new(10, 77, 1, 10), Ipv4Addr::new(10, 77, 2, 10)]
        );
        for (i, (node, _)) in nodes.iter().enumerate() {
            let pod =
                kubelet::create_pod(&client, ns, &format!("web-{i}"), node, &[("app", "web")])
                    .await
                    .expect("pod");
            assert_eq!(pod.spec.expect("spec").node_name.as_deref(), Some(*node));
        }
        // web-1 comes up not ready first: listed, but neither ready nor serving.
        kubelet::set_pod_ready(&client, ns, "web-0", pod_ips[0], true)
            .await
            .expect("status");
        let pod = kubelet::set_pod_ready(&client, ns, "web-1", pod_ips[1], false)
            .await
            .expect("status");
        let status = pod.status.expect("pod status");
        assert_eq!(status.pod_ip.as_deref(), Some("10.77.2.10"));
        assert_eq!(status.host_ip.as_deref(), Some("10.77.0.11"));
        wait_for_slices(
            &client,
            ns,
            "web",
            &[
                ep(pod_ips[0], "node-0", true, true, false),
                ep(pod_ips[1], "node-1", false, false, false),
            ],
        )
        .await;

        kubelet::set_pod_ready(&client, ns, "web-1", pod_ips[1], true)
            .await
            .expect("status");
        wait_for_slices(
            &client,
            ns,
            "web",
            &[
                ep(pod_ips[0], "node-0", true, true, false),
                ep(pod_ips[1], "node-1", true, true, false),
            ],
        )
        .await;

        // Deleted with a grace period, still passing its readiness probe: terminating and
        // serving, no longer ready.
        let pod = kubelet::mark_terminating(&client, ns, "web-1")
            .await
            .expect("delete");
        assert!(pod.metadata.deletion_timestamp.is_some());
        wait_for_slices(
            &client,
            ns,
            "web",
            &[
                ep(pod_ips[0], "node-0", true, true, false),
                ep(pod_ips[1], "node-1", false, true, true),
            ],
        )
        .await;

        // Its readiness probe fails while it drains: terminating and not serving.
        kubelet::set_pod_ready(&client, ns, "web-1", pod_ips[1], false)
            .await
            .expect("status");
        wait_for_slices(
            &client,
            ns,
            "web",
            &[
                ep(pod_ips[0], "node-0", true, true, false),
                ep(pod_ips[1], "node-1", false, false, true),
            ],
        )
        .await;
    });
}

/// RBAC is on and TokenRequest works: a ServiceAccount's token authenticates, may not read
/// Secrets, and may read what a Role grants it.
#[test]
fn service_account_tokens_are_subject_to_rbac() {
    let cp = start_isolated();
    runtime().block_on(async {
        let admin = cp.kube_client().await.expect("client");
        let ns = "default";
        let sa = "reader";
        let create = |kind: &str, body: serde_json::Value| {
            let mut cmd = cp.kubectl();
            cmd.args(["apply", "-f", "-"]);
            (kind.to_owned(), body, cmd)
        };
        for (kind, body, mut cmd) in [
            create(
                "ServiceAccount",
                json!({"apiVersion": "v1", "kind": "ServiceAccount",
                "metadata": {"name": sa, "namespace": ns}}),
            ),
            create(
                "Role",
                json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
                "metadata": {"name": "read-configmaps", "namespace": ns},
                "rules": [{"apiGroups": [""], "resources": ["configmaps"],
                           "verbs": ["get", "list"]}]}),
            ),
            create(
                "RoleBinding",
                json!({"apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "RoleBinding", "metadata": {"name": "reader", "namespace": ns},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                            "name": "read-configmaps"},
                "subjects": [{"kind": "ServiceAccount", "name": sa, "namespace": ns}]}),
            ),
        ] {
            run_with_stdin(&mut cmd, &body.to_string()).unwrap_or_else(|e| panic!("{kind}: {e}"));
        }
        // TokenRequest through kubectl (the API server signs with our key pair).
        let mut token_cmd = cp.kubectl();
        token_cmd.args(["create", "token", sa, "-n", ns, "--duration=10m"]);
        let token = run_with_stdin(&mut token_cmd, "").expect("kubectl create token");
        let token = token.trim();
        assert_eq!(token.split('.').count(), 3, "a JWT: {token}");

        let as_sa = cp
            .client_with_token(token)
            .await
            .expect("client with token");
        let secrets: Api<k8s_openapi::api::core::v1::Secret> = Api::namespaced(as_sa.clone(), ns);
        match secrets.list(&ListParams::default()).await {
            Err(kube::Error::Api(status)) => assert!(status.is_forbidden(), "{status:?}"),
            other => panic!("a ServiceAccount without a Role listed Secrets: {other:?}"),
        }
        let configmaps: Api<ConfigMap> = Api::namespaced(as_sa, ns);
        configmaps
            .list(&ListParams::default())
            .await
            .expect("granted by the Role");
        // The admin token is not subject to any of this.
        Api::<k8s_openapi::api::core::v1::Secret>::namespaced(admin, ns)
            .list(&ListParams::default())
            .await
            .expect("admin lists Secrets");
    });
}

fn run_with_stdin(cmd: &mut Command, input: &str) -> Result<String, String> {
    use std::io::Write;
    use std::process::Stdio;
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("{}: {e}", netns::describe(cmd)))?;
    child
        .stdin
        .take()
        .expect("piped")
        .write_all(input.as_bytes())
        .map_err(|e| e.to_string())?;
    let out = child.wait_with_output().map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(format!(
            "{} failed ({}): {}",
            netns::describe(cmd),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The API server can be stopped and started again mid-test: clients fail while it is down,
/// work again afterwards with every object still there (same etcd), and the controllers
/// resume.
#[test]
fn apiserver_restarts_with_its_data() {
    let mut cp = start_isolated();
    let rt = runtime();
    let client = rt.block_on(async {
        let client = cp.kube_client().await.expect("client");
        let cm: ConfigMap = serde_json::from_value(json!({
            "metadata": { "name": "survivor" },
            "data": { "k": "v" },
        }))
        .expect("valid ConfigMap");
        Api::<ConfigMap>::namespaced(client.clone(), "default")
            .create(&PostParams::default(), &cm)
            .await
            .expect("create ConfigMap");
        client
    });
    let before = cp.pids();
    let stopped = Instant::now();
    cp.stop_apiserver().expect("stop");
    eprintln!("kube-apiserver stopped in {:.1?}", stopped.elapsed());
    assert!(!cp.apiserver_running());
    assert_eq!(
        cp.pids().len(),
        2,
        "etcd and the controller manager keep running"
    );
    assert!(cp.stop_apiserver().is_err(), "stopping twice is an error");
    rt.block_on(async {
        let cms = Api::<ConfigMap>::namespaced(client.clone(), "default");
        let down = tokio::time::timeout(Duration::from_secs(20), cms.get("survivor")).await;
        assert!(
            matches!(down, Ok(Err(_))),
            "a request while the API server is down must fail: {down:?}"
        );
    });

    let restarted = Instant::now();
    cp.start_apiserver().expect("restart");
    eprintln!("kube-apiserver ready again in {:.1?}", restarted.elapsed());
    assert!(cp.start_apiserver().is_err(), "starting twice is an error");
    let after = cp.pids();
    assert_eq!(after.len(), 3);
    assert_ne!(before, after, "a new kube-apiserver process");

    rt.block_on(async {
        // The same client object, whose connections died with the old process.
        let cms = Api::<ConfigMap>::namespaced(client.clone(), "default");
        let cm = wait_for(
            "the old client to work again",
            Duration::from_secs(20),
            || async { cms.get_opt("survivor").await },
        )
        .await
        .expect("client works after the restart");
        assert_eq!(
            cm.data.expect("data").get("k").map(String::as_str),
            Some("v")
        );

        // The controller manager reconnected: a new Service gets its slice.
        kubelet::create_node(&client, "node-0", Ipv4Addr::new(10, 77, 0, 10))
            .await
            .expect("node");
        create_service(&client, "default", "after").await;
        kubelet::create_pod(&client, "default", "after-0", "node-0", &[("app", "after")])
            .await
            .expect("pod");
        kubelet::set_pod_ready(&client, "default", "after-0", pod_addr_of(0, 0), true)
            .await
            .expect("status");
        wait_for_slices(
            &client,
            "default",
            "after",
            &[ep(pod_addr_of(0, 0), "node-0", true, true, false)],
        )
        .await;
    });

    // A crash (SIGKILL) instead of an orderly stop: same story.
    cp.kill_apiserver().expect("kill");
    assert!(!cp.apiserver_running());
    assert!(cp.kill_apiserver().is_err(), "killing twice is an error");
    rt.block_on(async {
        let cms = Api::<ConfigMap>::namespaced(client.clone(), "default");
        assert!(cms.get("survivor").await.is_err(), "the API server is down");
    });
    cp.start_apiserver().expect("restart after kill");
    rt.block_on(async {
        let cms = Api::<ConfigMap>::namespaced(client.clone(), "default");
        wait_for(
            "the old client after a crash",
            Duration::from_secs(20),
            || async { cms.get_opt("survivor").await },
        )
        .await
        .expect("client works after the crash restart");
    });
}

/// In the lab: the control plane runs in `<prefix>-ctl` at 10.77.0.2, where processes in the
/// node namespaces (and, through the new routes, in the pod namespaces) reach it with
/// `kubeconfig()`; the test process reaches it through the loopback forwarder.
#[test]
fn control_plane_in_the_lab_serves_the_nodes() {
    let topo = Topology::build(TopologySpec::uniform(2, 1).with_control()).expect("lab");
    let ctl = topo.control_ns().expect("control namespace").to_owned();
    assert_eq!(ctl, format!("{}-ctl", topo.prefix()));
    assert_eq!(topo.control_addr(), Some(CONTROL_ADDR));
    assert!(topo.namespaces().contains(&ctl.as_str()));
    let cp = ControlPlane::start(&ctl, CONTROL_ADDR).unwrap_or_else(|e| panic!("start: {e}"));
    assert_eq!(
        cp.server_url(),
        format!("https://10.77.0.2:{APISERVER_PORT}")
    );

    let kubectl = &cp.binaries().kubectl;
    let readyz_from = |ns: &str| {
        netns::run(
            ns,
            &[
                kubectl.as_os_str(),
                "--kubeconfig".as_ref(),
                cp.kubeconfig().as_os_str(),
                "get".as_ref(),
                "--raw".as_ref(),
                "/readyz".as_ref(),
            ],
        )
        .unwrap_or_else(|e| panic!("kubectl /readyz from {ns}: {e}"))
    };
    for i in 0..topo.node_count() {
        assert_eq!(readyz_from(topo.node_ns(i)).trim(), "ok", "from node {i}");
        // Pods reach it through their node, and the control namespace routes the answer
        // back via that node.
        assert_eq!(
            readyz_from(topo.pod_ns(i, 0)).trim(),
            "ok",
            "from pod {i}/0"
        );
    }

    // The root-namespace view: kubectl and the kube client through the forwarder.
    let out = cp
        .kubectl()
        .args(["get", "--raw", "/readyz"])
        .output()
        .expect("run kubectl");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "ok");
    runtime().block_on(async {
        let client = cp.kube_client().await.expect("client");
        // The API server advertises its lab address: the `kubernetes` Service's endpoints.
        let slices = Api::<EndpointSlice>::namespaced(client, "default")
            .list(&ListParams::default().labels("kubernetes.io/service-name=kubernetes"))
            .await
            .expect("list slices");
        let addrs: Vec<String> = slices
            .into_iter()
            .flat_map(|s| s.endpoints)
            .flat_map(|e| e.addresses)
            .collect();
        assert_eq!(addrs, ["10.77.0.2"]);
    });
}

fn alive(pid: u32) -> bool {
    Path::new("/proc").join(pid.to_string()).exists()
}

/// PIDs of this test process's children (any thread's), from /proc/<pid>/stat.
fn child_pids() -> Vec<u32> {
    let me = std::process::id();
    let mut kids = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("read /proc").flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // "pid (comm) state ppid ...": comm may hold spaces, so split after the last ')'.
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        if ppid == Some(me) {
            kids.push(pid);
        }
    }
    kids
}

/// Our namespaces and temporary directories, to compare before and after a fixture.
fn leftovers() -> (Vec<String>, Vec<String>) {
    let ours = format!("lbx-{}-", std::process::id());
    let namespaces = netns::list_with_prefix(&ours).expect("list namespaces");
    let dir_prefix = format!("lbx-controlplane-{}-", std::process::id());
    let mut dirs: Vec<String> = std::fs::read_dir(std::env::temp_dir())
        .expect("read temp dir")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(&dir_prefix))
        .collect();
    dirs.sort();
    (namespaces, dirs)
}

/// A component that fails at start-up: the error names it, quotes the end of its log and
/// says where the log is; etcd, already running by then, is stopped, and the namespace and
/// files are gone.
#[test]
fn startup_failure_names_the_component_and_quotes_its_log() {
    let real = Binaries::locate().unwrap_or_else(|e| panic!("{e}"));
    let before = leftovers();
    let wrapper_dir = std::env::temp_dir().join(format!("lbx-fake-bin-{}", std::process::id()));
    std::fs::create_dir_all(&wrapper_dir).expect("create wrapper dir");
    let wrapper = wrapper_dir.join("kube-apiserver");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nexec '{}' --lbx-no-such-flag \"$@\"\n",
            real.kube_apiserver.display()
        ),
    )
    .expect("write wrapper");
    std::fs::set_permissions(
        &wrapper,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .expect("chmod wrapper");
    let broken = Binaries {
        kube_apiserver: wrapper,
        ..real
    };
    let err = ControlPlane::start_isolated_with_binaries(broken)
        .expect_err("an API server with an unknown flag cannot start");
    std::fs::remove_dir_all(&wrapper_dir).expect("remove wrapper dir");
    let text = err.to_string();
    eprintln!("{text}");
    match &err {
        ControlPlaneError::NotReady {
            component,
            problem,
            log,
            tail,
            ..
        } => {
            assert_eq!(*component, "kube-apiserver");
            assert!(problem.starts_with("exited"), "{problem}");
            assert!(tail.contains("unknown flag: --lbx-no-such-flag"), "{tail}");
            assert!(text.contains(&log.display().to_string()), "{text}");
            if std::env::var_os("LBX_KEEP_LOGS").is_some_and(|v| v == "1") {
                // Kept on purpose: check, then clean up so the comparison below holds.
                let dir = log.parent().expect("log in the work dir");
                assert!(text.contains("files kept in"), "{text}");
                assert!(log.is_file(), "{} kept", log.display());
                std::fs::remove_dir_all(dir).expect("remove kept dir");
            } else {
                assert!(text.contains("LBX_KEEP_LOGS=1"), "{text}");
            }
        }
        other => panic!("expected NotReady, got {other:?}"),
    }
    assert_eq!(child_pids(), Vec::<u32>::new(), "etcd must be stopped");
    assert_eq!(leftovers(), before, "namespaces or temp dirs left behind");
}

/// Dropping the fixture stops every process and removes its namespace and files, also when
/// the test panics; in a lab it leaves the lab's namespace to the topology.
#[test]
fn teardown_leaves_nothing_behind() {
    // Isolated, normal drop.
    let mut cp = start_isolated();
    let ns = cp.netns().to_owned();
    let dir = cp.work_dir().to_owned();
    let pids = cp.pids();
    assert_eq!(
        pids.len(),
        3,
        "etcd, kube-apiserver, kube-controller-manager"
    );
    assert!(pids.iter().all(|&p| alive(p)));
    assert_eq!(netns::list_with_prefix(&ns).expect("list"), [ns.as_str()]);
    drop(cp);
    assert_eq!(pids.iter().filter(|&&p| alive(p)).count(), 0, "{pids:?}");
    assert!(netns::list_with_prefix(&ns).expect("list").is_empty());
    assert!(!dir.exists(), "{} left behind", dir.display());

    // Isolated, dropped while a panic unwinds.
    let (tx, rx) = std::sync::mpsc::channel();
    let panicked = std::panic::catch_unwind(move || {
        let mut cp = start_isolated();
        tx.send((cp.netns().to_owned(), cp.work_dir().to_owned(), cp.pids()))
            .expect("send");
        panic!("a failing test");
    });
    assert!(panicked.is_err());
    let (ns, dir, pids) = rx.recv().expect("fixture started");
    assert_eq!(pids.len(), 3);
    assert_eq!(pids.iter().filter(|&&p| alive(p)).count(), 0, "{pids:?}");
    assert!(netns::list_with_prefix(&ns).expect("list").is_empty());
    assert!(!dir.exists(), "{} left behind", dir.display());

    // In a lab: the fixture stops its processes, the topology removes the namespaces.
    let topo = Topology::build(TopologySpec::uniform(1, 1).with_control()).expect("lab");
    let prefix = topo.prefix().to_owned();
    let ctl = topo.control_ns().expect("control namespace").to_owned();
    let mut cp = ControlPlane::start(&ctl, CONTROL_ADDR).unwrap_or_else(|e| panic!("start: {e}"));
    let pids = cp.pids();
    drop(cp);
    assert_eq!(pids.iter().filter(|&&p| alive(p)).count(), 0, "{pids:?}");
    assert!(
        netns::list_with_prefix(&ctl).expect("list").contains(&ctl),
        "the fixture must not delete a namespace it did not create"
    );
    drop(topo);
    assert!(netns::list_with_prefix(&format!("{prefix}-"))
        .expect("list")
        .is_empty());
    assert_eq!(
        child_pids(),
        Vec::<u32>::new(),
        "no process of ours survives"
    );
}
