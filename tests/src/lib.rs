//! Integration tests live in `it/`; this crate only builds the guest plugins they load.
