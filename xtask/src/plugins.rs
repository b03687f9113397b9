//! `cargo xtask test-plugins`: build every plugin under `plugins/`, install the `.so` files into a
//! fresh plugins directory, write a config per plugin naming it with its backend's options, and run
//! the plugin conformance suite through the real loader; then build the deliberately broken
//! fixtures under `plugins/testing/` (and the example plugin) and run the loading tests on them.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};

/// Plugin crates are named `strata-plugin-<name>`, `<name>` being the name they declare.
const PLUGIN_PREFIX: &str = "strata-plugin-";

/// A crate directly under a plugins directory.
struct PluginCrate {
    package: String,
}

impl PluginCrate {
    /// The file cargo builds for it.
    fn library(&self) -> String {
        format!("lib{}.so", self.package.replace('-', "_"))
    }

    /// The name the plugin declares (checked by the suite, which loads it by this name).
    fn plugin_name(&self) -> Result<&str> {
        self.package.strip_prefix(PLUGIN_PREFIX).with_context(|| {
            format!(
                "plugin crate {:?} must be named {PLUGIN_PREFIX}<the name it declares>",
                self.package
            )
        })
    }
}

pub fn test_plugins() -> Result<()> {
    super::require_root()?;
    // The plugins' backends need system packages (the nfs plugin's NFS server).
    super::ensure_packages(super::TEST_PACKAGES)?;
    let cargo = super::cargo();
    let root = super::workspace_root();
    let plugins = crates_in(&root.join("plugins"))?;
    let fixtures = crates_in(&root.join("plugins/testing"))?;
    if plugins.is_empty() {
        bail!("no plugin crates under {}", root.join("plugins").display());
    }

    let mut build = vec!["build", "--lib"];
    for c in plugins.iter().chain(&fixtures) {
        build.extend(["-p", c.package.as_str()]);
    }
    super::run(&cargo, &build)?;
    super::run(
        &cargo,
        &["build", "-p", "fs-plugin-api", "--example", "hello_plugin"],
    )?;
    let built = target_dir(&cargo)?.join("debug");

    let work = std::env::temp_dir().join(format!("strata-test-plugins-{}", std::process::id()));
    if work.exists() {
        fs::remove_dir_all(&work).with_context(|| format!("remove {}", work.display()))?;
    }
    let result = install_and_test(&cargo, &built, &work, &plugins, &fixtures);
    let cleaned = clean_up(&work);
    result.and(cleaned)
}

fn install_and_test(
    cargo: &str,
    built: &Path,
    work: &Path,
    plugins: &[PluginCrate],
    fixtures: &[PluginCrate],
) -> Result<()> {
    let plugins_dir = work.join("plugins");
    let configs_dir = work.join("configs");
    let fixtures_dir = work.join("fixtures");
    for dir in [&plugins_dir, &configs_dir, &fixtures_dir] {
        fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    }

    for plugin in plugins {
        copy(&built.join(plugin.library()), &plugins_dir)?;
        let name = plugin.plugin_name()?;
        let options = backend_options(name, &work.join("backends").join(name))?;
        let config = format!(
            "# Written by `cargo xtask test-plugins`.\nroot = {}\nplugins_dir = {}\n\n[filesystem]\nplugin = {}\n\n[filesystem.options]\n{options}",
            toml_string(&work.join("root").to_string_lossy()),
            toml_string(&plugins_dir.to_string_lossy()),
            toml_string(name),
        );
        let path = configs_dir.join(format!("{name}.toml"));
        fs::write(&path, config).with_context(|| format!("write {}", path.display()))?;
    }
    for fixture in fixtures {
        copy(&built.join(fixture.library()), &fixtures_dir)?;
    }
    copy(&built.join("examples/libhello_plugin.so"), &fixtures_dir)?;

    // The plugins' own unit tests.
    let mut unit = vec!["test"];
    for plugin in plugins {
        unit.extend(["-p", plugin.package.as_str()]);
    }
    super::run(cargo, &unit)?;

    let args = [
        "test",
        "-p",
        "fs-plugin-api",
        "--test",
        "plugin_conformance",
        "--test",
        "plugin_loading",
        "-p",
        "strata",
        "--test",
        "local_plugin",
        "--test",
        "nfs_plugin",
        "--test",
        "http_plugin",
    ];
    eprintln!(
        "xtask: running {cargo} {} with STRATA_PLUGINS_DIR={} STRATA_PLUGIN_CONFIGS={} STRATA_TEST_PLUGINS_DIR={}",
        args.join(" "),
        plugins_dir.display(),
        configs_dir.display(),
        fixtures_dir.display()
    );
    let status = Command::new(cargo)
        .args(args)
        .env("STRATA_PLUGINS_DIR", &plugins_dir)
        .env("STRATA_PLUGIN_CONFIGS", &configs_dir)
        .env("STRATA_TEST_PLUGINS_DIR", &fixtures_dir)
        .current_dir(super::workspace_root())
        .status()
        .with_context(|| format!("cannot start {cargo}"))?;
    if !status.success() {
        bail!("the plugin tests failed ({status})");
    }
    Ok(())
}

/// The `[filesystem.options]` lines for plugin `name`, its backend set up under `dir`.
fn backend_options(name: &str, dir: &Path) -> Result<String> {
    match name {
        "local" => {
            let store = dir.join("store");
            fs::create_dir_all(&store).with_context(|| format!("create {}", store.display()))?;
            Ok(format!(
                "store = {}\n",
                toml_string(&store.to_string_lossy())
            ))
        }
        "nfs" => {
            // The conformance suite starts nfs-ganesha exporting this directory on these ports
            // (its NFS path is its own path); the ports are free now and picked here so that the
            // config can name them.
            let export = dir.join("export");
            fs::create_dir_all(&export).with_context(|| format!("create {}", export.display()))?;
            let [nfs_port, mount_port] = free_ports()?;
            Ok(format!(
                "server = \"127.0.0.1\"\nexport = {}\nmount_port = {mount_port}\nnfs_port = {nfs_port}\n\
                 store_layout = \"sha256-dirs\"\nnfs_version = 3\ntimeout_ms = 5000\n",
                toml_string(&export.to_string_lossy())
            ))
        }
        "http" => {
            // The conformance suite starts docker-registry on this port (free now). No prefetch,
            // no background fetch and no check interval: a layer that became fully cached, or
            // was answered for lately, would pass Check without asking the registry, so the
            // suite's "backend gone" check would mean nothing.
            let cache = dir.join("cache");
            fs::create_dir_all(&cache).with_context(|| format!("create {}", cache.display()))?;
            let [port, _] = free_ports()?;
            Ok(format!(
                "cache_dir = {}\nprefetch_bytes = 0\nbackground_fetch = false\nresolve_timeout_secs = 20\n\
                 check_interval_secs = 0\n\
                 registry = {{ timeout_secs = 5, retries = 1, hosts = {{ \"127.0.0.1:{port}\" = {{ plain_http = true }} }} }}\n",
                toml_string(&cache.to_string_lossy())
            ))
        }
        other => bail!(
            "no backend for plugin {other:?}: set one up in `backend_options` (xtask/src/plugins.rs) \
             and drive it from `backend_for` (fs-plugin-api/tests/plugin_conformance.rs)"
        ),
    }
}

/// Two distinct TCP ports on 127.0.0.1 that nothing listens on (as of now).
fn free_ports() -> Result<[u16; 2]> {
    let bind =
        || std::net::TcpListener::bind("127.0.0.1:0").context("bind a free port on 127.0.0.1");
    let (a, b) = (bind()?, bind()?);
    Ok([
        a.local_addr().context("local address")?.port(),
        b.local_addr().context("local address")?.port(),
    ])
}

/// The crates directly under `dir` (directories with a Cargo.toml), by package name.
fn crates_in(dir: &Path) -> Result<Vec<PluginCrate>> {
    let mut crates = Vec::new();
    for entry in fs::read_dir(dir).with_context(|| format!("read {}", dir.display()))? {
        let manifest = entry?.path().join("Cargo.toml");
        if !manifest.is_file() {
            continue;
        }
        let text = fs::read_to_string(&manifest)
            .with_context(|| format!("read {}", manifest.display()))?;
        let package = package_name(&text)
            .with_context(|| format!("{}: no [package] name", manifest.display()))?;
        crates.push(PluginCrate { package });
    }
    crates.sort_by(|a, b| a.package.cmp(&b.package));
    Ok(crates)
}

/// The `name` of the `[package]` table of a manifest (plain `name = "..."` lines only).
fn package_name(manifest: &str) -> Option<String> {
    let mut in_package = false;
    for line in manifest.lines().map(str::trim) {
        if line.starts_with('[') {
            in_package = line == "[package]";
        } else if in_package
            && let Some(value) = line.strip_prefix("name").map(str::trim_start)
            && let Some(value) = value.strip_prefix('=')
        {
            return Some(value.trim().trim_matches('"').to_owned());
        }
    }
    None
}

/// Where cargo puts build output (honours `CARGO_TARGET_DIR` and cargo config).
fn target_dir(cargo: &str) -> Result<PathBuf> {
    let out = Command::new(cargo)
        .args(["metadata", "--format-version", "1", "--no-deps"])
        .current_dir(super::workspace_root())
        .output()
        .context("cannot run cargo metadata")?;
    if !out.status.success() {
        bail!(
            "cargo metadata failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let json = String::from_utf8_lossy(&out.stdout);
    let key = "\"target_directory\":\"";
    let start = json
        .find(key)
        .context("cargo metadata: no target_directory")?
        + key.len();
    let end = json[start..]
        .find('"')
        .context("cargo metadata: unterminated target_directory")?;
    Ok(PathBuf::from(&json[start..start + end]))
}

fn copy(file: &Path, dir: &Path) -> Result<()> {
    let name = file.file_name().context("no file name")?;
    fs::copy(file, dir.join(name))
        .with_context(|| format!("copy {} into {}", file.display(), dir.display()))?;
    Ok(())
}

/// A TOML basic string.
fn toml_string(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", u32::from(c))),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Detaches anything the tests left mounted under `work` (and fails if there was any), then
/// removes `work`.
fn clean_up(work: &Path) -> Result<()> {
    if !work.exists() {
        return Ok(());
    }
    let info = fs::read_to_string("/proc/self/mountinfo").context("read /proc/self/mountinfo")?;
    let prefix = format!("{}/", work.display());
    let mut left: Vec<&str> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|p| p.starts_with(&prefix))
        .collect();
    // Innermost first.
    left.sort_by_key(|p| std::cmp::Reverse(p.len()));
    for mountpoint in &left {
        let _ = Command::new("umount").args(["-l", mountpoint]).status();
    }
    if !left.is_empty() {
        bail!(
            "the plugin tests left mounts behind (now detached): {}; {} kept for inspection",
            left.join(", "),
            work.display()
        );
    }
    fs::remove_dir_all(work).with_context(|| format!("remove {}", work.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn package_name_reads_the_package_table_only() {
        let manifest =
            "[lib]\nname = \"x\"\n[package]\nversion = \"1\"\nname = \"strata-plugin-local\"\n";
        assert_eq!(
            package_name(manifest).as_deref(),
            Some("strata-plugin-local")
        );
        assert_eq!(package_name("[lib]\nname = \"x\"\n"), None);
    }

    #[test]
    fn toml_strings_are_escaped() {
        assert_eq!(toml_string("a\"b\\c\n"), "\"a\\\"b\\\\c\\u000A\"");
    }

    #[test]
    fn plugin_names_come_from_the_package_name() {
        let c = PluginCrate {
            package: "strata-plugin-local".into(),
        };
        assert_eq!(c.plugin_name().unwrap(), "local");
        assert_eq!(c.library(), "libstrata_plugin_local.so");
        let bad = PluginCrate {
            package: "local".into(),
        };
        assert!(bad.plugin_name().is_err());
    }
}
