//! The forward pass's thread pool: [`switchyard_pool`], shared with native kernel plugins.

pub use switchyard_pool::ThreadPool;
