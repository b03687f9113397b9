//! TEST FIXTURE: a shared library that is not a strata plugin (no abi_stable root module). The
//! host must reject it with "not a strata plugin".

/// Something to export.
#[unsafe(no_mangle)]
pub extern "C" fn strata_test_not_a_plugin() -> u32 {
    42
}
