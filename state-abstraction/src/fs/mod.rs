//! The file service: NFS-like operations over abstract objects, implemented by a conformance
//! wrapper over a real local directory.

pub mod ops;

pub use ops::*;
