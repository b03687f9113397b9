//! Generates the gRPC code of containerd's Snapshots service from the vendored protos in
//! `src/serve/proto` (see its ORIGIN.md), with the pure-Rust `protox` compiler (no `protoc`).

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("src/serve/proto");
    let files = [
        root.join("services/snapshots/v1/snapshots.proto"),
        root.join("types/mount.proto"),
    ];
    for f in &files {
        println!("cargo:rerun-if-changed={}", f.display());
    }
    let fds = protox::compile(&files, [&root])?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_fds(fds)?;
    Ok(())
}
