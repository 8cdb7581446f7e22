//! Support for the integration tests in `it/`: paths of the guest components
//! that `build.rs` compiles from `plugins/`.

/// Paths of the compiled guest components.
pub mod guests {
    include!(concat!(env!("OUT_DIR"), "/guests.rs"));
}
