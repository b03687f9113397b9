//! A [`Snapshotter`] over containerd's Snapshots gRPC API on a unix socket (containerd's
//! `snapshots/proxy` client): every call is one RPC, errors come back with their kinds, `walk`
//! consumes the `List` stream. Blocking calls drive the client's own tokio runtime, so it is
//! used from plain threads (never from inside an async runtime).

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use snapshot_core::{CommitOpts, Error, Info, Labels, Mount, Result, Snapshotter, Usage};
use tonic::transport::{Channel, Endpoint, Uri};

use super::convert::{
    error_from_status, info_from_proto, info_to_proto, labels_to_proto, mount_from_proto,
};
use super::proto::snapshots as pb;
use super::proto::snapshots::snapshots_client::SnapshotsClient;

/// What `close` (or drop) runs once, e.g. stopping an in-process server.
type OnClose = Box<dyn FnOnce() -> Result<()> + Send>;

/// gRPC message size limit, both ways (as containerd's proxy client).
const MAX_MESSAGE_SIZE: usize = 16 << 20;

/// A snapshotter reached through the Snapshots gRPC service.
pub struct GrpcSnapshotter {
    rt: tokio::runtime::Runtime,
    client: SnapshotsClient<Channel>,
    snapshotter: String,
    capabilities: Vec<String>,
    on_close: Mutex<Option<OnClose>>,
}

impl GrpcSnapshotter {
    /// Connects to the service on `socket`, naming `snapshotter` in every request.
    pub fn connect(socket: &Path, snapshotter: &str) -> Result<GrpcSnapshotter> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .map_err(|e| Error::io("start the client runtime", e))?;
        let path: PathBuf = socket.to_path_buf();
        let channel = rt
            .block_on(async move {
                // The URI is required but unused: the connector always dials the socket.
                Endpoint::from_static("http://localhost")
                    .connect_with_connector(tower::service_fn(move |_: Uri| {
                        let path = path.clone();
                        async move {
                            let stream = tokio::net::UnixStream::connect(path).await?;
                            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
                        }
                    }))
                    .await
            })
            .map_err(|e| Error::Unavailable(format!("connect to {}: {e}", socket.display())))?;
        let client = SnapshotsClient::new(channel)
            .max_decoding_message_size(MAX_MESSAGE_SIZE)
            .max_encoding_message_size(MAX_MESSAGE_SIZE);
        Ok(GrpcSnapshotter {
            rt,
            client,
            snapshotter: snapshotter.to_owned(),
            capabilities: Vec::new(),
            on_close: Mutex::new(None),
        })
    }

    /// Advertises `capabilities` (the gRPC API has no call for them: containerd reads them from
    /// its proxy plugin config).
    pub fn with_capabilities(mut self, capabilities: Vec<String>) -> Self {
        self.capabilities = capabilities;
        self
    }

    /// Runs `f` once, on the first `close` or on drop.
    pub fn on_close(self, f: impl FnOnce() -> Result<()> + Send + 'static) -> Self {
        if let Ok(mut slot) = self.on_close.lock() {
            *slot = Some(Box::new(f));
        }
        self
    }

    fn call<T, F, Fut>(&self, what: &str, f: F) -> Result<T>
    where
        F: FnOnce(SnapshotsClient<Channel>) -> Fut,
        Fut: Future<Output = std::result::Result<tonic::Response<T>, tonic::Status>>,
    {
        let client = self.client.clone();
        self.rt
            .block_on(f(client))
            .map(tonic::Response::into_inner)
            .map_err(|s| error_from_status(what, &s))
    }

    fn run_on_close(&self) -> Result<()> {
        let f = match self.on_close.lock() {
            Ok(mut slot) => slot.take(),
            Err(poisoned) => poisoned.into_inner().take(),
        };
        f.map_or(Ok(()), |f| f())
    }
}

impl Snapshotter for GrpcSnapshotter {
    fn stat(&self, key: &str) -> Result<Info> {
        let req = pb::StatSnapshotRequest {
            snapshotter: self.snapshotter.clone(),
            key: key.to_owned(),
        };
        let resp = self.call("stat", |mut c| async move { c.stat(req).await })?;
        resp.info
            .map(info_from_proto)
            .ok_or_else(|| Error::io("stat", std::io::Error::other("response without info")))
    }

    fn update(&self, info: &Info, fieldpaths: &[&str]) -> Result<Info> {
        let req = pb::UpdateSnapshotRequest {
            snapshotter: self.snapshotter.clone(),
            info: Some(info_to_proto(info)),
            update_mask: Some(prost_types::FieldMask {
                paths: fieldpaths.iter().map(|p| (*p).to_owned()).collect(),
            }),
        };
        let resp = self.call("update", |mut c| async move { c.update(req).await })?;
        resp.info
            .map(info_from_proto)
            .ok_or_else(|| Error::io("update", std::io::Error::other("response without info")))
    }

    fn usage(&self, key: &str) -> Result<Usage> {
        let req = pb::UsageRequest {
            snapshotter: self.snapshotter.clone(),
            key: key.to_owned(),
        };
        let resp = self.call("usage", |mut c| async move { c.usage(req).await })?;
        Ok(Usage {
            size: resp.size,
            inodes: resp.inodes,
        })
    }

    fn mounts(&self, key: &str) -> Result<Vec<Mount>> {
        let req = pb::MountsRequest {
            snapshotter: self.snapshotter.clone(),
            key: key.to_owned(),
        };
        let resp = self.call("mounts", |mut c| async move { c.mounts(req).await })?;
        Ok(resp.mounts.into_iter().map(mount_from_proto).collect())
    }

    fn prepare(&self, key: &str, parent: &str, labels: &Labels) -> Result<Vec<Mount>> {
        let req = pb::PrepareSnapshotRequest {
            snapshotter: self.snapshotter.clone(),
            key: key.to_owned(),
            parent: parent.to_owned(),
            labels: labels_to_proto(labels),
        };
        let resp = self.call("prepare", |mut c| async move { c.prepare(req).await })?;
        Ok(resp.mounts.into_iter().map(mount_from_proto).collect())
    }

    fn view(&self, key: &str, parent: &str, labels: &Labels) -> Result<Vec<Mount>> {
        let req = pb::ViewSnapshotRequest {
            snapshotter: self.snapshotter.clone(),
            key: key.to_owned(),
            parent: parent.to_owned(),
            labels: labels_to_proto(labels),
        };
        let resp = self.call("view", |mut c| async move { c.view(req).await })?;
        Ok(resp.mounts.into_iter().map(mount_from_proto).collect())
    }

    fn commit(&self, name: &str, key: &str, opts: &CommitOpts) -> Result<()> {
        let req = pb::CommitSnapshotRequest {
            snapshotter: self.snapshotter.clone(),
            name: name.to_owned(),
            key: key.to_owned(),
            labels: labels_to_proto(&opts.labels),
            parent: opts.parent.clone().unwrap_or_default(),
        };
        self.call("commit", |mut c| async move { c.commit(req).await })
    }

    fn remove(&self, key: &str) -> Result<()> {
        let req = pb::RemoveSnapshotRequest {
            snapshotter: self.snapshotter.clone(),
            key: key.to_owned(),
        };
        self.call("remove", |mut c| async move { c.remove(req).await })
    }

    fn walk(&self, filters: &[&str], f: &mut dyn FnMut(&Info) -> Result<()>) -> Result<()> {
        let req = pb::ListSnapshotsRequest {
            snapshotter: self.snapshotter.clone(),
            filters: filters.iter().map(|s| (*s).to_owned()).collect(),
        };
        let mut stream = self.call("list", |mut c| async move { c.list(req).await })?;
        // `f` runs outside the runtime: it may call this snapshotter again (stat in a walk).
        // Returning early drops the stream, which cancels the call.
        loop {
            let msg = self
                .rt
                .block_on(stream.message())
                .map_err(|s| error_from_status("list", &s))?;
            let Some(batch) = msg else { return Ok(()) };
            for info in batch.info {
                f(&info_from_proto(info))?;
            }
        }
    }

    fn cleanup(&self) -> Result<()> {
        let req = pb::CleanupRequest {
            snapshotter: self.snapshotter.clone(),
        };
        self.call("cleanup", |mut c| async move { c.cleanup(req).await })
    }

    /// Like containerd's proxy client, sends nothing; runs the `on_close` hook the first time.
    fn close(&self) -> Result<()> {
        self.run_on_close()
    }

    fn capabilities(&self) -> Vec<String> {
        self.capabilities.clone()
    }
}

impl Drop for GrpcSnapshotter {
    fn drop(&mut self) {
        if let Err(e) = self.run_on_close() {
            tracing::warn!(error = %e, "closing the gRPC snapshotter");
        }
    }
}
