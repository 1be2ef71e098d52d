//! The wall clock, as every part of the server reads it.

/// Unix time in seconds, with sub-second precision.
pub fn unix_now() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}
