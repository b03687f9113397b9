//! The gRPC pieces of `strata serve` (`src/serve/`) compiled into the tests, plus helpers to run
//! a server in-process: the binary crate exports nothing, so the tests include its files.
#![allow(dead_code)] // each test crate uses part of it

#[path = "../../src/serve/client.rs"]
pub mod client;
#[path = "../../src/serve/convert.rs"]
pub mod convert;
#[path = "../../src/serve/proto.rs"]
pub mod proto;
#[path = "../../src/serve/service.rs"]
pub mod service;

use std::path::Path;
use std::sync::Arc;

use snapshot_core::{Error, Result, Snapshotter};

pub use client::GrpcSnapshotter;

/// Serves `sn` on `socket` in-process (on a runtime of its own) and returns a client for it;
/// closing or dropping the client shuts the server down gracefully, which closes `sn`.
pub fn serve_in_process(sn: Arc<dyn Snapshotter>, socket: &Path) -> Result<GrpcSnapshotter> {
    let capabilities = sn.capabilities();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| Error::io("server runtime", e))?;
    let listener = {
        let _guard = rt.enter();
        tokio::net::UnixListener::bind(socket)
            .map_err(|e| Error::io(format!("bind {}", socket.display()), e))?
    };
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = rt.spawn(service::serve(listener, sn, async move {
        let _ = stop_rx.await;
    }));
    let client = GrpcSnapshotter::connect(socket, "strata")?.with_capabilities(capabilities);
    Ok(client.on_close(move || {
        let _ = stop_tx.send(());
        let res = rt.block_on(server);
        drop(rt);
        match res {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(Error::io("server", std::io::Error::other(format!("{e:#}")))),
            Err(e) => Err(Error::io("server task", std::io::Error::other(e))),
        }
    }))
}
