//! Admission: one operation lets a create call in. The service key's limits and quotas are counted (in the
//! store, exact across nodes), the request is created, and if the create fails what was counted is given back.

use super::{CreateError, Created, Engine};
use crate::domain::{CreateRequest, Kind, ServiceKey, UpstreamKey};
use crate::keys::Refusal;

/// Why a call was not let in.
#[derive(Debug, thiserror::Error)]
pub enum AdmitError {
    /// The key's limits or quotas refused it (nothing was counted).
    #[error("the service key's limits refused the call")]
    Refused(Refusal),
    /// The engine refused it (what the key's limits counted was given back).
    #[error(transparent)]
    Create(#[from] CreateError),
}

impl From<Refusal> for AdmitError {
    fn from(refusal: Refusal) -> Self {
        AdmitError::Refused(refusal)
    }
}

impl Engine {
    /// Admits a call of `key` (`None` while the server runs open) and starts it: counted against the key's limits
    /// and quotas, then created; a create that fails gives back what was counted.
    pub async fn admit(
        &self,
        key: Option<&ServiceKey>,
        kind: Kind,
        request: CreateRequest,
        caller_key: Option<UpstreamKey>,
    ) -> Result<Created, AdmitError> {
        let gate = &self.inner.gate;
        let mut admission = match key {
            Some(key) => Some(gate.admit(key).await?),
            None => None,
        };
        let held = admission.as_mut().and_then(|a| a.slot.take());
        match self.create(kind, request, caller_key, (held, key.map(|k| k.id.clone()))).await {
            Ok(created) => Ok(created),
            Err(e) => {
                if let (Some(admission), Some(key)) = (admission, key) {
                    gate.refund(admission, key).await;
                }
                Err(e.into())
            }
        }
    }
}
