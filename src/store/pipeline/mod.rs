//! The write pipeline: every write to the request family goes through here, and the batching and scheduling of
//! writes lives here and nowhere else.
//!
//! - [`persister`]: the one queue of writes, the engine's handle on the store's writes ([`Persister`]): creates'
//!   inserts at once, everything else batched per flush interval, kept and retried while the store fails.
//! - [`plan`]: the rules of a batch ("nothing after a final status", progress folded, writes grouped by kind),
//!   one pure function over the batch used by both stores, which only execute the [`plan::Plan`] in SQL.
//! - [`serial`]: the schedule of a store that executes its writes one at a time on a thread of its own
//!   (SQLite's writer): creates' inserts first and together, and let into a long batch after a millisecond.

mod lanes;
pub mod persister;
pub mod plan;
pub mod serial;

pub use persister::{Persister, Receipt};
