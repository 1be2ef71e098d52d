//! Domain types: everything that crosses the edge is parsed into one of these once, and is valid from then on.

pub mod clock;
pub mod create;
pub mod host;
pub mod ids;
pub mod locator;
pub mod secret;
pub mod service_key;
pub mod status;
pub mod token;

pub use clock::unix_now;
pub use create::{Continuation, CreateRequest, FieldError, Limits};
pub use ids::{Access, Format, Kind, NodeId, RequestId};
pub use locator::{Locator, Suffix};
pub use secret::UpstreamKey;
pub use service_key::{ApiKey, KeyLimits, ServiceKey};
pub use status::Status;
pub use token::{AccessToken, TokenHash};
