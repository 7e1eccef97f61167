//! Shared fixtures for the cross-crate tests of pretext.
