//! Trellis host.
