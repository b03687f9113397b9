//! TEST FIXTURE, not a real plugin: what a plugin built against a future fs-plugin-api with
//! plugin ABI 2.0.0 looks like to this host (the constructor takes one more argument). The host
//! must refuse it by its version, naming the file.

// abi_stable names the generated pointer type `FsPluginMod_Ref`, and the header static
// `#[export_root_module]` generates has no doc comment.
#![allow(non_camel_case_types, missing_docs)]

use abi_stable::{
    StableAbi, declare_root_module_statics, export_root_module,
    library::RootModule,
    prefix_type::PrefixTypeTrait,
    sabi_types::VersionStrings,
    std_types::{RStr, RString},
};

/// The pretend ABI 2.0.0 root module.
#[repr(C)]
#[derive(StableAbi)]
#[sabi(kind(Prefix(prefix_ref = FsPluginMod_Ref)))]
pub struct FsPluginMod {
    /// The ABI version.
    pub abi_version: RStr<'static>,
    /// The declared name.
    pub name: RStr<'static>,
    /// The plugin's version.
    pub version: RStr<'static>,
    /// The ABI 2 constructor.
    #[sabi(last_prefix_field)]
    pub new: extern "C" fn(options_json: RStr<'_>, flags: u64) -> RString,
}

impl RootModule for FsPluginMod_Ref {
    declare_root_module_statics! {FsPluginMod_Ref}
    const BASE_NAME: &'static str = "strata_fs_plugin";
    const NAME: &'static str = "strata_fs_plugin";
    const VERSION_STRINGS: VersionStrings = VersionStrings::new("2.0.0");
}

extern "C" fn new(_options_json: RStr<'_>, _flags: u64) -> RString {
    RString::from("never called")
}

/// The exported root module.
#[export_root_module]
pub fn root_module() -> FsPluginMod_Ref {
    FsPluginMod {
        abi_version: RStr::from_str("2.0.0"),
        name: RStr::from_str("wrong-abi"),
        version: RStr::from_str(env!("CARGO_PKG_VERSION")),
        new,
    }
    .leak_into_prefix()
}
