//! Attaching and pinning, in a namespace of our own: native XDP where the driver has it,
//! generic fallback with a warning and a counter where it does not, a clear error where
//! neither works; pinned maps survive a restart of the loader.

use lb_common::{port_be, Frontend, FrontendKey, PROTO_TCP};
use lb_tests::netns::{in_netns, ip, unique_prefix, NetNs};
use lb_user::bpf::dataplane::{
    AttachMode, Dataplane, DataplaneError, DataplaneOptions, XdpModeChoice,
};

fn small() -> DataplaneOptions {
    DataplaneOptions {
        max_services: 4,
        maglev_size: 251,
        max_backends: 16,
        max_frontends: 16,
        ct_entries: 1024,
        affinity_entries: 64,
        pin_dir: None,
    }
}

#[test]
fn native_then_generic_fallback_then_clear_error() {
    let ns = NetNs::create(&format!("{}-attach", unique_prefix())).unwrap();
    let n = ns.name().to_string();
    ip(&[
        "-n", &n, "link", "add", "veth-a", "type", "veth", "peer", "name", "veth-b",
    ])
    .unwrap();
    ip(&["-n", &n, "link", "add", "br-x", "type", "bridge"]).unwrap();
    for dev in ["veth-a", "veth-b", "br-x"] {
        ip(&["-n", &n, "link", "set", dev, "up"]).unwrap();
    }
    in_netns(&n, || {
        // veth has native XDP.
        let mut dp = Dataplane::load(small()).unwrap();
        assert_eq!(
            dp.attach_xdp("veth-a", XdpModeChoice::Auto).unwrap(),
            AttachMode::Native
        );
        assert_eq!(dp.generic_fallbacks, 0);

        // a bridge has no native XDP: auto falls back to generic and counts it.
        let mut dp2 = Dataplane::load(small()).unwrap();
        let err = dp2.attach_xdp("br-x", XdpModeChoice::Native).unwrap_err();
        assert!(matches!(err, DataplaneError::XdpAttachMode { .. }), "{err}");
        assert!(err.to_string().contains("br-x"), "{err}");
        assert_eq!(
            dp2.attach_xdp("br-x", XdpModeChoice::Auto).unwrap(),
            AttachMode::Generic
        );
        assert_eq!(dp2.generic_fallbacks, 1);

        // Neither mode works on an interface that does not exist: one error naming both.
        let mut dp3 = Dataplane::load(small()).unwrap();
        let err = dp3.attach_xdp("nosuch0", XdpModeChoice::Auto).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, DataplaneError::XdpAttach { .. }), "{msg}");
        assert!(
            msg.contains("nosuch0") && msg.contains("native") && msg.contains("generic"),
            "{msg}"
        );

        // The TC reply program attaches to a pod-side veth.
        dp.attach_tc_reply("veth-b").unwrap();
    })
    .unwrap();
    let links = ip(&["-n", &n, "-j", "link", "show", "veth-a"]).unwrap();
    // All Dataplanes dropped: their attachments are gone with them.
    assert!(
        !links.contains("\"xdp\""),
        "XDP still attached after drop: {links}"
    );
}

#[test]
fn pinned_maps_survive_a_restart() {
    let dir = std::path::PathBuf::from(format!("/sys/fs/bpf/lbx/{}-pins", unique_prefix()));
    let opts = DataplaneOptions {
        pin_dir: Some(dir.clone()),
        ..small()
    };
    let key = FrontendKey {
        addr: 0,
        port: port_be(30080),
        proto: PROTO_TCP,
        _pad: 0,
    };
    let fe = Frontend {
        service_id: 1,
        backend_count: 2,
        flags: 0,
        affinity_timeout_s: 0,
    };
    {
        let mut dp = Dataplane::load(opts.clone()).unwrap();
        dp.set_frontend(&key, &fe).unwrap();
        dp.write_ring(1, &[(0, 5), (7, 6)]).unwrap();
    }
    let result = std::panic::catch_unwind(|| {
        let dp = Dataplane::load(opts.clone()).unwrap();
        let fes = dp.frontends().unwrap();
        assert_eq!(fes, vec![(key, fe)], "frontend lost across restart");
        let ring = dp.ring(1).unwrap();
        assert_eq!(
            (ring[0], ring[7], ring[1]),
            (5, 6, 0),
            "ring lost across restart"
        );
    });
    std::fs::remove_dir_all(&dir).unwrap();
    result.unwrap();
}
