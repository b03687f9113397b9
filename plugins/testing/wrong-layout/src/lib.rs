//! TEST FIXTURE, not a real plugin: claims plugin ABI 1.0.0, but its root module is declared by
//! another package (as with a plugin built against a copied or forked interface) and its
//! constructor has another signature. abi_stable's layout check refuses it (it records each
//! type's package and version, then compares fields), and the host must report that in one line,
//! naming the file. A changed field in the same package is covered by fs-plugin-api's unit tests.

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

/// A root module with the right version and the wrong layout.
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
    /// A constructor with the wrong signature.
    #[sabi(last_prefix_field)]
    pub new: extern "C" fn(options_json: RString) -> u32,
}

impl RootModule for FsPluginMod_Ref {
    declare_root_module_statics! {FsPluginMod_Ref}
    const BASE_NAME: &'static str = "strata_fs_plugin";
    const NAME: &'static str = "strata_fs_plugin";
    const VERSION_STRINGS: VersionStrings = VersionStrings::new("1.0.0");
}

extern "C" fn new(_options_json: RString) -> u32 {
    0
}

/// The exported root module.
#[export_root_module]
pub fn root_module() -> FsPluginMod_Ref {
    FsPluginMod {
        abi_version: RStr::from_str("1.0.0"),
        name: RStr::from_str("wrong-layout"),
        version: RStr::from_str(env!("CARGO_PKG_VERSION")),
        new,
    }
    .leak_into_prefix()
}
