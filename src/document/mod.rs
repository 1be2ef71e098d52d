//! The status document (`.json`): the request's fixed facts, its progress, and the response body, rendered the
//! same way whether the request is live in memory or read back from the store.

pub mod assembler;
pub mod model;
pub mod render;
pub mod usage;

pub use assembler::{Assembler, ChunkKind};
pub use model::{Attempt, ErrorInfo, Progress, RequestMeta, ResponseMeta, Served};
pub use render::{BodyView, Urls, render};
