//! `strata` with the `local` backing file system: an image exported into a layer store is
//! unpacked on another root without writing its files again (its layers are remote snapshots),
//! and its root filesystem mounts and reads correctly.
//!
//! Run by `cargo xtask test-plugins`, which builds and installs the plugins into
//! `STRATA_PLUGINS_DIR` (it is `test = false`, so a plain `cargo test` does not pick it up).
#![allow(clippy::unwrap_used)] // tests may unwrap

mod support;

use support::strata_ok;

use std::path::Path;
use std::process::Command;

fn mounted_under(dir: &Path) -> usize {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    info.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|p| Path::new(p).starts_with(dir))
        .count()
}

#[test]
fn layers_in_a_local_store_are_mounted_not_unpacked() {
    let plugins = std::env::var("STRATA_PLUGINS_DIR").expect(
        "STRATA_PLUGINS_DIR must name the installed plugins: run `cargo xtask test-plugins`",
    );
    let tmp = tempfile::tempdir().unwrap();
    let p = |s: &str| tmp.path().join(s).display().to_string();

    // Node 1 builds the image and publishes its layers into the store.
    let image = format!("{}:demo", p("image"));
    strata_ok(&["--root", &p("root1"), "demo", "--image", &p("image")]);
    let exported = strata_ok(&["export", "--to", &p("store"), &image]);
    assert_eq!(exported.lines().count(), 3, "{exported}");
    assert!(
        exported.lines().all(|l| l.ends_with("Written")),
        "{exported}"
    );
    let again = strata_ok(&["export", "--to", &p("store"), &image]);
    assert!(
        again.lines().all(|l| l.ends_with("Present")),
        "export is idempotent: {again}"
    );

    // Node 2 mounts from the store.
    let config = tmp.path().join("strata.toml");
    std::fs::write(
        &config,
        format!(
            "root = {:?}\nplugins_dir = {plugins:?}\n[filesystem]\nplugin = \"local\"\n[filesystem.options]\nstore = {:?}\n",
            p("root2"),
            p("store")
        ),
    )
    .unwrap();
    let cfg = config.display().to_string();
    let chain = strata_ok(&["--config", &cfg, "unpack", &image]);
    let ls = strata_ok(&["--config", &cfg, "ls"]);
    let remote = ls.lines().filter(|l| l.contains(" remote ")).count();
    assert_eq!(remote, 3, "every layer is a remote snapshot: {ls}");
    assert!(ls.contains(chain.trim()), "{ls}");
    let root2 = tmp.path().join("root2/snapshots");
    assert_eq!(
        mounted_under(&root2),
        3,
        "each layer is a mount of the store, not a copy"
    );
    let copied: usize = std::fs::read_dir(&root2)
        .unwrap()
        .map(|e| e.unwrap().path().join("fs/top.txt"))
        .filter(|f| f.exists())
        .count();
    assert_eq!(copied, 1, "top.txt is only visible through the store mount");

    // A plugin's progress report beside a layer's mountpoint shows in `strata ls`.
    let some_layer = std::fs::read_dir(&root2)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let status = fs_plugin_api::status::LayerStatus {
        plugin: "local".into(),
        layer: "sha256:00".into(),
        state: "lazy".into(),
        percent_cached: 42.0,
        ..Default::default()
    };
    fs_plugin_api::status::write_status(&some_layer.join("fs"), &status).unwrap();
    let ls = strata_ok(&["--config", &cfg, "ls"]);
    assert_eq!(ls.matches(" lazy 42% ").count(), 1, "{ls}");
    fs_plugin_api::status::remove_status(&some_layer.join("fs")).unwrap();

    let target = tmp.path().join("rootfs");
    std::fs::create_dir(&target).unwrap();
    let t = target.display().to_string();
    strata_ok(&["--config", &cfg, "mount", &image, &t, "--rw", "--name", "c"]);
    let top = std::fs::read_to_string(target.join("top.txt"));
    let motd = target.join("etc/motd").exists();
    let stale = target.join("var/cache/stale").exists();
    std::fs::write(target.join("scratch"), "x").unwrap();
    strata_ok(&["--config", &cfg, "umount", &t, "--rm", "--name", "c"]);
    assert_eq!(top.unwrap(), "hello from the top layer\n");
    assert!(!motd, "whiteout from the store layer applies");
    assert!(!stale, "opaque directory from the store layer applies");
    assert!(!tmp.path().join("store").join("scratch").exists());

    // Remove everything: remote layers are unmounted, the store is intact.
    let init = format!("{} linux-init", chain.trim());
    strata_ok(&["--config", &cfg, "rm", &init]);
    let ls = strata_ok(&["--config", &cfg, "ls"]);
    let mut names: Vec<(String, String)> = ls
        .lines()
        .skip(1)
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f[0].to_string(), f.get(3).unwrap_or(&"").to_string())
        })
        .collect();
    // Children first.
    while let Some(i) = names
        .iter()
        .position(|(n, _)| !names.iter().any(|(_, parent)| parent == n))
    {
        let (n, _) = names.remove(i);
        strata_ok(&["--config", &cfg, "rm", &n]);
    }
    assert_eq!(mounted_under(&root2), 0, "no mount left behind");
    assert!(
        std::fs::read_dir(tmp.path().join("store/sha256"))
            .unwrap()
            .count()
            == 3
    );
}
