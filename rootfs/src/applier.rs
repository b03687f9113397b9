//! The `Applier` strata uses: layer blobs read (and digest-verified) from a [`ContentStore`],
//! written by [`crate::apply::apply_to_mounts`].

use std::io::Read;
use std::sync::Arc;

use oci_spec::image::{Descriptor, DescriptorBuilder, MediaType};
use snapshot_core::Mount;

use crate::content::ContentStore;
use crate::{Applier, Error, Result};

/// Called with a layer's blob descriptor and the number of compressed bytes read so far.
pub type ProgressFn = dyn Fn(&Descriptor, u64) + Send + Sync;

/// Applies layers whose blobs live in a content store.
pub struct ContentApplier {
    store: ContentStore,
    progress: Option<Arc<ProgressFn>>,
}

impl ContentApplier {
    /// An applier reading blobs from `store`.
    pub fn new(store: ContentStore) -> ContentApplier {
        ContentApplier {
            store,
            progress: None,
        }
    }

    /// Reports read progress per layer (for progress bars).
    pub fn with_progress(mut self, progress: Arc<ProgressFn>) -> ContentApplier {
        self.progress = Some(progress);
        self
    }
}

/// Counts bytes read and reports them, at most every 256 KiB and at EOF.
struct Counting<'a, R> {
    inner: R,
    desc: &'a Descriptor,
    read: u64,
    reported: u64,
    progress: &'a ProgressFn,
}

impl<R: Read> Read for Counting<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.read += n as u64;
        if n == 0 || self.read - self.reported >= 256 * 1024 {
            self.reported = self.read;
            (self.progress)(self.desc, self.read);
        }
        Ok(n)
    }
}

impl Applier for ContentApplier {
    fn apply(&self, blob: &Descriptor, mounts: &[Mount]) -> Result<Descriptor> {
        let reader = self.store.open_blob(blob)?;
        let media_type = blob.media_type().to_string();
        let applied = match &self.progress {
            Some(p) => {
                let counting = Counting {
                    inner: reader,
                    desc: blob,
                    read: 0,
                    reported: 0,
                    progress: p.as_ref(),
                };
                crate::apply::apply_to_mounts(&media_type, counting, mounts)?
            }
            None => crate::apply::apply_to_mounts(&media_type, reader, mounts)?,
        };
        DescriptorBuilder::default()
            .media_type(MediaType::ImageLayer)
            .digest(applied.diff_id)
            .size(applied.size)
            .build()
            .map_err(|e| Error::InvalidArgument(format!("build descriptor: {e}")))
    }
}
