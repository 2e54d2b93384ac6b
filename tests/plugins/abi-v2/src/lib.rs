//! A descriptor claiming ABI 2.0: the host must refuse it at the handshake.

use switchyard_plugin_abi::{kind, PluginDescriptor, Str};

static DESC: PluginDescriptor = PluginDescriptor {
    abi_major: 2,
    abi_minor: 0,
    kind: kind::KV_ALLOCATOR,
    name: Str::new("abi-v2"),
    version: Str::new("2.0.0"),
    features: 0,
    vtable: std::ptr::null(),
    vtable_size: 0,
};

/// The root symbol.
#[no_mangle]
pub extern "C" fn switchyard_plugin_v1() -> *const PluginDescriptor {
    &DESC
}
