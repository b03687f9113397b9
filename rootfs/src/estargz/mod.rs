//! eStargz: gzip tar layers readable by random access (stargz-snapshotter's format).
//!
//! A layer is a concatenation of gzip members (one per file payload or chunk), then a member
//! holding the TOC (`stargz.index.json`), then a footer giving the TOC's offset. [`read_toc`]
//! opens a blob through [`ReadAt`], [`Index`] turns the TOC into a file tree in overlay form,
//! and [`decompress_chunk`] returns a chunk's bytes only after checking its digest.
//! [`convert_layer`] writes such layers.

mod footer;
mod index;
mod reader;
mod toc;
mod writer;

pub use footer::{FOOTER_SIZE, LEGACY_FOOTER_SIZE, footer, parse_footer};
pub use index::{Chunk, Index, IndexOptions, Node, NodeId, NodeKind, ROOT};
pub use reader::{
    MAX_TOC_COMPRESSED, MAX_TOC_JSON, OpenedToc, ReadAt, decompress_chunk, read_toc, verify_chunk,
    verify_toc_digest,
};
pub use toc::{EntryType, Toc, TocEntry};
pub use writer::{Converted, WriterOptions, convert_layer};

/// Name of the TOC's tar entry.
pub const TOC_NAME: &str = "stargz.index.json";
/// Layer annotation (and snapshot label) carrying the digest of the TOC JSON.
pub const TOC_DIGEST_ANNOTATION: &str = "containerd.io/snapshot/stargz/toc.digest";
/// Layer annotation with the uncompressed size of an eStargz layer.
pub const UNCOMPRESSED_SIZE_ANNOTATION: &str = "io.containers.estargz.uncompressed-size";
/// Landmark ending the prioritised files (placed first in the layer).
pub const PREFETCH_LANDMARK: &str = ".prefetch.landmark";
/// Landmark saying the layer has no prioritised files.
pub const NO_PREFETCH_LANDMARK: &str = ".no.prefetch.landmark";
/// Default chunk size of large files.
pub const DEFAULT_CHUNK_SIZE: u64 = 4 << 20;
