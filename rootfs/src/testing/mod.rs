//! Test harnesses for strata's tests (cargo feature `testing`): a real OCI registry
//! ([`TestRegistry`], Debian's `docker-registry`), pushing OCI layouts to it with `skopeo`
//! ([`push_oci_layout`]), and a fault-injecting HTTP proxy in front of it ([`FaultProxy`]).
//!
//! ```no_run
//! use rootfs::testing::{FaultProxy, Mode, TestRegistry};
//! # fn demo(layout: &std::path::Path) -> rootfs::Result<()> {
//! let registry = TestRegistry::start()?;
//! registry.push(layout, "v1", "test/app:v1")?;
//! let proxy = FaultProxy::start(registry.addr())?;
//! proxy.set_mode(Mode::StripRange);
//! // ... point a client at proxy.host() with plain HTTP ...
//! # Ok(())
//! # }
//! ```

mod proxy;
mod registry;

pub use proxy::{FaultProxy, Mode, ProxyAuth};
pub use registry::{TestRegistry, push_oci_layout, run_bounded};
