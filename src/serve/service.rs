//! The `containerd.services.snapshots.v1.Snapshots` gRPC service over any [`Snapshotter`]
//! (containerd's `contrib/snapshotservice.FromSnapshotter`, SEMANTICS.md §7.1), and serving it on
//! a unix socket with graceful shutdown.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use snapshot_core::{CommitOpts, Info, Snapshotter};
use tokio::net::UnixListener;
use tokio::sync::{RwLock, mpsc};
use tokio_stream::wrappers::{ReceiverStream, UnixListenerStream};
use tonic::{Request, Response, Status};

use super::convert::{
    info_from_proto, info_to_proto, labels_from_proto, mount_to_proto, status_from_error,
};
use super::proto::snapshots::snapshots_server::{Snapshots, SnapshotsServer};
use super::proto::snapshots::{
    CleanupRequest, CommitSnapshotRequest, ListSnapshotsRequest, ListSnapshotsResponse,
    MountsRequest, MountsResponse, PrepareSnapshotRequest, PrepareSnapshotResponse,
    RemoveSnapshotRequest, StatSnapshotRequest, StatSnapshotResponse, UpdateSnapshotRequest,
    UpdateSnapshotResponse, UsageRequest, UsageResponse, ViewSnapshotRequest, ViewSnapshotResponse,
};

/// Infos per `List` response message (containerd sends batches of 100).
pub const LIST_BATCH: usize = 100;

/// gRPC message size limit, both ways (containerd's proxy client uses 16 MiB).
pub const MAX_MESSAGE_SIZE: usize = 16 << 20;

/// How long shutdown waits for open connections to finish their calls before it stops anyway.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// The snapshotter and a gate that in-flight operations hold shared, and closing holds
/// exclusively, so the snapshotter closes only after every started operation has finished (even
/// one whose caller went away) and no operation starts after it closed.
#[derive(Clone)]
struct Backend {
    sn: Arc<dyn Snapshotter>,
    /// `true` once the snapshotter is closed.
    closed: Arc<RwLock<bool>>,
}

impl Backend {
    /// Runs `f` on the blocking thread pool, never on the async workers.
    async fn run<T, F>(&self, op: &'static str, key: &str, f: F) -> Result<T, Status>
    where
        T: Send + 'static,
        F: FnOnce(&dyn Snapshotter) -> snapshot_core::Result<T> + Send + 'static,
    {
        let guard = self.closed.clone().read_owned().await;
        if *guard {
            return Err(Status::unavailable("snapshotter is shutting down"));
        }
        let sn = self.sn.clone();
        let res = tokio::task::spawn_blocking(move || {
            let r = f(sn.as_ref());
            drop(guard);
            r
        })
        .await
        .map_err(|e| Status::internal(format!("{op}: blocking task failed: {e}")))?;
        res.map_err(|e| {
            if e.kind() == snapshot_core::ErrorKind::Unknown {
                tracing::warn!(op, key, error = %e, "snapshot operation failed");
            } else {
                tracing::debug!(op, key, kind = %e.kind(), error = %e, "snapshot operation refused");
            }
            status_from_error(&e)
        })
    }

    /// Waits for in-flight operations, then closes the snapshotter (once).
    async fn close(&self) -> snapshot_core::Result<()> {
        let mut closed = self.closed.write().await;
        if *closed {
            return Ok(());
        }
        *closed = true;
        let sn = self.sn.clone();
        tokio::task::spawn_blocking(move || sn.close())
            .await
            .map_err(|e| snapshot_core::Error::io("close", std::io::Error::other(e)))?
    }
}

/// The Snapshots service for one snapshotter. Requests' `snapshotter` field is ignored: a proxy
/// plugin serves exactly one snapshotter, whatever containerd calls it.
pub struct SnapshotsService {
    backend: Backend,
}

impl SnapshotsService {
    /// A service over `sn`.
    pub fn new(sn: Arc<dyn Snapshotter>) -> Self {
        SnapshotsService {
            backend: Backend {
                sn,
                closed: Arc::new(RwLock::new(false)),
            },
        }
    }
}

type ListStream =
    Pin<Box<dyn tokio_stream::Stream<Item = Result<ListSnapshotsResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Snapshots for SnapshotsService {
    async fn prepare(
        &self,
        req: Request<PrepareSnapshotRequest>,
    ) -> Result<Response<PrepareSnapshotResponse>, Status> {
        let r = req.into_inner();
        tracing::debug!(key = r.key, parent = r.parent, "prepare");
        let key = r.key.clone();
        let mounts = self
            .backend
            .run("prepare", &key, move |sn| {
                sn.prepare(&r.key, &r.parent, &labels_from_proto(r.labels))
            })
            .await?;
        Ok(Response::new(PrepareSnapshotResponse {
            mounts: mounts.iter().map(mount_to_proto).collect(),
        }))
    }

    async fn view(
        &self,
        req: Request<ViewSnapshotRequest>,
    ) -> Result<Response<ViewSnapshotResponse>, Status> {
        let r = req.into_inner();
        tracing::debug!(key = r.key, parent = r.parent, "view");
        let key = r.key.clone();
        let mounts = self
            .backend
            .run("view", &key, move |sn| {
                sn.view(&r.key, &r.parent, &labels_from_proto(r.labels))
            })
            .await?;
        Ok(Response::new(ViewSnapshotResponse {
            mounts: mounts.iter().map(mount_to_proto).collect(),
        }))
    }

    async fn mounts(
        &self,
        req: Request<MountsRequest>,
    ) -> Result<Response<MountsResponse>, Status> {
        let r = req.into_inner();
        tracing::debug!(key = r.key, "mounts");
        let key = r.key.clone();
        let mounts = self
            .backend
            .run("mounts", &key, move |sn| sn.mounts(&r.key))
            .await?;
        Ok(Response::new(MountsResponse {
            mounts: mounts.iter().map(mount_to_proto).collect(),
        }))
    }

    async fn commit(&self, req: Request<CommitSnapshotRequest>) -> Result<Response<()>, Status> {
        let r = req.into_inner();
        tracing::debug!(name = r.name, key = r.key, parent = r.parent, "commit");
        let key = r.key.clone();
        // `parent` (containerd 2.x, field 5) asks to rebase the active snapshot onto it; 1.6
        // clients never set it.
        let opts = CommitOpts {
            labels: labels_from_proto(r.labels),
            parent: (!r.parent.is_empty()).then_some(r.parent),
        };
        self.backend
            .run("commit", &key, move |sn| sn.commit(&r.name, &r.key, &opts))
            .await?;
        Ok(Response::new(()))
    }

    async fn remove(&self, req: Request<RemoveSnapshotRequest>) -> Result<Response<()>, Status> {
        let r = req.into_inner();
        tracing::debug!(key = r.key, "remove");
        let key = r.key.clone();
        self.backend
            .run("remove", &key, move |sn| sn.remove(&r.key))
            .await?;
        Ok(Response::new(()))
    }

    async fn stat(
        &self,
        req: Request<StatSnapshotRequest>,
    ) -> Result<Response<StatSnapshotResponse>, Status> {
        let r = req.into_inner();
        tracing::trace!(key = r.key, "stat");
        let key = r.key.clone();
        let info = self
            .backend
            .run("stat", &key, move |sn| sn.stat(&r.key))
            .await?;
        Ok(Response::new(StatSnapshotResponse {
            info: Some(info_to_proto(&info)),
        }))
    }

    async fn update(
        &self,
        req: Request<UpdateSnapshotRequest>,
    ) -> Result<Response<UpdateSnapshotResponse>, Status> {
        let r = req.into_inner();
        let info: Info = r
            .info
            .map(info_from_proto)
            .unwrap_or_else(|| Info::named(""));
        let paths = r.update_mask.map(|m| m.paths).unwrap_or_default();
        tracing::debug!(key = info.name, ?paths, "update");
        let key = info.name.clone();
        let info = self
            .backend
            .run("update", &key, move |sn| {
                let paths: Vec<&str> = paths.iter().map(String::as_str).collect();
                sn.update(&info, &paths)
            })
            .await?;
        Ok(Response::new(UpdateSnapshotResponse {
            info: Some(info_to_proto(&info)),
        }))
    }

    type ListStream = ListStream;

    async fn list(
        &self,
        req: Request<ListSnapshotsRequest>,
    ) -> Result<Response<Self::ListStream>, Status> {
        let filters = req.into_inner().filters;
        tracing::debug!(?filters, "list");
        let (tx, rx) = mpsc::channel::<Result<ListSnapshotsResponse, Status>>(4);
        let backend = self.backend.clone();
        // The walk runs on the blocking pool and streams batches as it goes; the bounded channel
        // paces it to the client. A client that goes away stops the walk.
        tokio::spawn(async move {
            let send = tx.clone();
            let res = backend
                .run("list", "", move |sn| {
                    let filters: Vec<&str> = filters.iter().map(String::as_str).collect();
                    let mut batch = Vec::with_capacity(LIST_BATCH);
                    let gone =
                        || snapshot_core::Error::Unavailable("list: client went away".into());
                    sn.walk(&filters, &mut |info| {
                        batch.push(info_to_proto(info));
                        if batch.len() >= LIST_BATCH {
                            let info =
                                std::mem::replace(&mut batch, Vec::with_capacity(LIST_BATCH));
                            send.blocking_send(Ok(ListSnapshotsResponse { info }))
                                .map_err(|_| gone())?;
                        }
                        Ok(())
                    })?;
                    if !batch.is_empty() {
                        send.blocking_send(Ok(ListSnapshotsResponse { info: batch }))
                            .map_err(|_| gone())?;
                    }
                    Ok(())
                })
                .await;
            // Unlike containerd 1.6 (whose List returns the Walk error unconverted, so clients
            // see UNKNOWN), the error keeps its kind's code. That is strictly better, and
            // containerd's proxy client converts any code back to its kind.
            if let Err(status) = res {
                let _ = tx.send(Err(status)).await;
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn usage(&self, req: Request<UsageRequest>) -> Result<Response<UsageResponse>, Status> {
        let r = req.into_inner();
        tracing::trace!(key = r.key, "usage");
        let key = r.key.clone();
        let u = self
            .backend
            .run("usage", &key, move |sn| sn.usage(&r.key))
            .await?;
        Ok(Response::new(UsageResponse {
            size: u.size,
            inodes: u.inodes,
        }))
    }

    async fn cleanup(&self, _req: Request<CleanupRequest>) -> Result<Response<()>, Status> {
        tracing::debug!("cleanup");
        self.backend.run("cleanup", "", |sn| sn.cleanup()).await?;
        Ok(Response::new(()))
    }
}

/// Serves `sn` on `listener` until `shutdown` completes; then stops accepting, lets open
/// connections finish their calls (at most [`DRAIN_TIMEOUT`]), waits for operations still
/// running and closes the snapshotter.
pub async fn serve<S>(
    listener: UnixListener,
    sn: Arc<dyn Snapshotter>,
    shutdown: S,
) -> anyhow::Result<()>
where
    S: Future<Output = ()> + Send + 'static,
{
    let service = SnapshotsService::new(sn);
    let backend = service.backend.clone();
    let server = SnapshotsServer::new(service)
        .max_decoding_message_size(MAX_MESSAGE_SIZE)
        .max_encoding_message_size(MAX_MESSAGE_SIZE);
    let (draining_tx, draining_rx) = tokio::sync::oneshot::channel::<()>();
    let shutdown = async move {
        shutdown.await;
        tracing::info!("shutting down: no new connections, finishing calls in flight");
        let _ = draining_tx.send(());
    };
    let serving = tonic::transport::Server::builder()
        .add_service(server)
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown);
    let drain_deadline = async move {
        if draining_rx.await.is_ok() {
            tokio::time::sleep(DRAIN_TIMEOUT).await;
        } else {
            std::future::pending::<()>().await;
        }
    };
    let served = tokio::select! {
        r = serving => r.map_err(anyhow::Error::from),
        () = drain_deadline => {
            tracing::warn!(timeout = ?DRAIN_TIMEOUT, "connections still open after the drain timeout; closing anyway");
            Ok(())
        }
    };
    let closed = backend.close().await;
    served?;
    closed.map_err(|e| anyhow::anyhow!("close the snapshotter: {e}"))
}
