//! State versions: what a plugin keeps, and what it converts from.

/// The version of the state a plugin keeps, and the versions it converts
/// from (contract 0.3's `schema`; a plugin without it keeps version 0).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StateVersion {
    pub current: u32,
    pub migrates_from: Vec<u32>,
}

impl StateVersion {
    /// Whether a plugin of this version can take over state holding the
    /// versions `held` (the same version, or one it migrates from); the
    /// reason when it cannot.
    pub fn takes_over(&self, held: &std::collections::BTreeSet<u32>) -> Result<(), String> {
        let unreadable: Vec<String> = held
            .iter()
            .filter(|v| **v != self.current && !self.migrates_from.contains(v))
            .map(u32::to_string)
            .collect();
        if unreadable.is_empty() {
            return Ok(());
        }
        let from = match self.migrates_from.as_slice() {
            [] => "it has no migrate".to_string(),
            versions => {
                format!("it migrates from {}", versions.iter().map(u32::to_string).collect::<Vec<_>>().join(", "))
            }
        };
        Err(format!(
            "it keeps state version {}, and the pipeline's state holds version {}: {from} (declare the versions it converts in its migrate, or keep the state version)",
            self.current,
            unreadable.join(", ")
        ))
    }
}
