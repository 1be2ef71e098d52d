//! The status lifecycle of a request.

/// `pending` -> `posting` -> (`waiting` | `streaming`) -> one of the final statuses. Never backwards.
#[derive(Clone, Copy, PartialEq, Eq, Debug, PartialOrd, Ord)]
pub enum Status {
    /// Accepted and stored, not yet sent upstream.
    Pending,
    /// Sent upstream, no response yet.
    Posting,
    /// Async request: the upstream answered with headers, the body is in progress.
    Waiting,
    /// Stream request: the first chunk arrived.
    Streaming,
    Done,
    Error,
    Stop,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Pending => "pending",
            Status::Posting => "posting",
            Status::Waiting => "waiting",
            Status::Streaming => "streaming",
            Status::Done => "done",
            Status::Error => "error",
            Status::Stop => "stop",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "pending" => Status::Pending,
            "posting" => Status::Posting,
            "waiting" => Status::Waiting,
            "streaming" => Status::Streaming,
            "done" => Status::Done,
            "error" => Status::Error,
            "stop" => Status::Stop,
            _ => return None,
        })
    }

    pub fn is_final(self) -> bool {
        matches!(self, Status::Done | Status::Error | Status::Stop)
    }

    /// Whether moving from `self` to `next` keeps the lifecycle monotonic.
    pub fn can_become(self, next: Status) -> bool {
        !self.is_final() && next > self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn final_statuses_never_change() {
        for f in [Status::Done, Status::Error, Status::Stop] {
            for n in [Status::Pending, Status::Streaming, Status::Done, Status::Error, Status::Stop] {
                assert!(!f.can_become(n));
            }
        }
    }

    #[test]
    fn statuses_only_move_forward() {
        assert!(Status::Pending.can_become(Status::Posting));
        assert!(Status::Posting.can_become(Status::Streaming));
        assert!(Status::Streaming.can_become(Status::Stop));
        assert!(!Status::Streaming.can_become(Status::Posting));
        assert_eq!(Status::parse("waiting"), Some(Status::Waiting));
    }
}
