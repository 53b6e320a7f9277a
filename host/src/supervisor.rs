//! One owner for plugin-version health: which chain of plugin versions a
//! pipeline runs, whether it is failing, and what happens then.
//!
//! - **Probation.** After a hot swap the new chain runs on probation for
//!   [`PROBATION_BATCHES`] batches: a batch of at least
//!   [`SURGE_MIN_RECORDS`] records with more than half of them failing,
//!   where the previous version failed under 5%, is an *error surge*.
//!   Nothing the new chain makes is delivered before it is judged on that
//!   many records: its first batch, and any later one with a failure, is
//!   [gathered](Verdict::Gather) up to [`SURGE_MIN_RECORDS`] first (a
//!   batch no more records join is judged as it is).
//! - **Failing.** A chain is failing after a surge, or when one of its
//!   stages says so (a fault streak, or record isolation over its budget:
//!   [`crate::runtime::PluginInstance::take_failing`]).
//! - **What then** is the pipeline's [`OnPluginFailure`]: `rollback` swaps
//!   back to the previous chain (kept since the swap) and runs the batch
//!   again through it, before any output of the failing version is
//!   delivered, and [refuses](Refused) the failing version (file and
//!   config) until either changes; with no previous chain, or with
//!   `pause`, the pipeline pauses (nothing delivered, nothing committed)
//!   until a new version is dropped in; `dead_letter` delivers the failures
//!   as dead letters and goes on.
//!
//! The [`Supervisor`] decides; the transform stage only acts on its
//! [`Verdict`]. It works on anything [`Versioned`], so its rules are tested
//! against fake chains.

use crate::config::OnPluginFailure;
use crate::record::Results;
use crate::telemetry::telemetry;
use crate::transforms::{Chain, ChainFailure, VersionFailing};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tracing::{error, info};

/// Batches a new version runs on probation after a hot swap: an error surge
/// in one of them counts as the version failing.
pub const PROBATION_BATCHES: u32 = 10;

/// A batch is judged for an error surge only from this many records on.
pub const SURGE_MIN_RECORDS: usize = 10;

/// What the supervisor needs of a chain of plugin versions.
pub trait Versioned {
    /// The first stage found failing by the last batch, if any (its own
    /// verdict: a fault streak, or isolation over budget); taken once.
    fn take_failing(&mut self) -> Option<VersionFailing>;
    /// Each stage's plugin and version, in order.
    fn versions(&self) -> Vec<StageVersion>;
}

/// One stage's plugin and version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StageVersion {
    pub plugin: String,
    /// The component's SHA-256.
    pub hash: String,
    /// The version with its configuration ([`crate::runtime::version_key`]).
    pub key: String,
}

impl StageVersion {
    fn short(&self) -> &str {
        self.hash.get(..12).unwrap_or(&self.hash)
    }
}

impl Versioned for Chain {
    fn take_failing(&mut self) -> Option<VersionFailing> {
        Chain::take_failing(self)
    }

    fn versions(&self) -> Vec<StageVersion> {
        self.stages()
            .iter()
            .map(|s| StageVersion {
                plugin: s.plugin().name.clone(),
                hash: s.plugin().hash.clone(),
                key: s.version_key(),
            })
            .collect()
    }
}

/// `(plugin, short version)` of each stage, for the metrics and `/status`.
pub fn shown_versions(chain: &impl Versioned) -> Vec<(String, String)> {
    chain.versions().iter().map(|v| (v.plugin.clone(), v.short().to_string())).collect()
}

/// The plugin versions rolled back, with why, for the whole process: a
/// refused version (file and config) comes back only as a different file
/// or config, on any reload.
#[derive(Debug, Clone, Default)]
pub struct Refused(Arc<Mutex<BTreeMap<String, String>>>);

impl Refused {
    /// Refuses version `key` (see [`crate::runtime::version_key`]) for `reason`.
    pub fn refuse(&self, key: &str, reason: &str) {
        if let Ok(mut refused) = self.0.lock() {
            refused.insert(key.to_string(), reason.to_string());
        }
    }

    /// Why version `key` is refused, if it is.
    pub fn reason(&self, key: &str) -> Option<String> {
        self.0.lock().ok().and_then(|r| r.get(key).cloned())
    }
}

/// What to do with a batch the current chain has just run.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Deliver its results.
    Deliver,
    /// The chain is failing and the policy is `dead_letter`: deliver the
    /// results (their failures are dead letters) and go on.
    DeliverFailing(VersionFailing),
    /// The failing chain was rolled back: run the batch again through the
    /// chain now current.
    RunAgain,
    /// On probation, a batch too small to judge (the new chain's first, or
    /// one with failures): deliver nothing, read more records into the
    /// batch and run it again.
    Gather,
    /// The chain is failing and there is nothing to roll back to (or the
    /// policy is `pause`): deliver nothing, wait for a new version.
    Pause(VersionFailing),
}

/// The chain a pipeline runs, the one it ran before the last hot swap (for
/// a rollback), and how often their records fail.
pub struct Supervisor<C> {
    pipeline: String,
    current: C,
    /// The chain before the last swap, kept for [`OnPluginFailure::Rollback`].
    previous: Option<C>,
    policy: OnPluginFailure,
    refused: Refused,
    /// Batches the current chain has run since it went live.
    batches: u32,
    /// The current chain's recent record errors and records (decaying sums).
    recent: (f64, f64),
    /// The previous chain's recent error rate when it was swapped out.
    previous_rate: f64,
}

impl<C: Versioned> Supervisor<C> {
    pub fn new(pipeline: String, current: C, policy: OnPluginFailure, refused: Refused) -> Self {
        Supervisor {
            pipeline,
            current,
            previous: None,
            policy,
            refused,
            batches: PROBATION_BATCHES,
            recent: (0.0, 0.0),
            previous_rate: 0.0,
        }
    }

    pub fn pipeline(&self) -> &str {
        &self.pipeline
    }

    /// The chain to run the next batch through.
    pub fn current(&mut self) -> &mut C {
        &mut self.current
    }

    fn rate(&self) -> f64 {
        if self.recent.1 == 0.0 {
            0.0
        } else {
            self.recent.0 / self.recent.1
        }
    }

    /// A hot swap: `new` goes live, the current chain is kept for a rollback.
    pub fn swap_in(&mut self, new: C) {
        // The new chain is compiled, instantiated and initialised already:
        // the pause is moving the old one aside.
        let started = Instant::now();
        self.previous_rate = self.rate();
        self.previous = Some(std::mem::replace(&mut self.current, new));
        self.went_live(started);
    }

    /// A new version while paused: the failing chain is dropped, not kept.
    pub fn replace(&mut self, new: C) {
        let started = Instant::now();
        drop(std::mem::replace(&mut self.current, new));
        self.went_live(started);
    }

    fn went_live(&mut self, started: Instant) {
        self.batches = 0;
        self.recent = (0.0, 0.0);
        let pause_us = started.elapsed().as_micros() as u64;
        let live = shown_versions(&self.current);
        let shown: Vec<String> = live.iter().map(|(name, version)| format!("{name}@{version}")).collect();
        info!(pipeline = %self.pipeline, plugins = %shown.join(" -> "), pause_us, "new plugin versions live");
        telemetry().set_plugins(&self.pipeline, &live);
    }

    /// Whether the current chain is a new version still on probation.
    pub fn on_probation(&self) -> bool {
        self.batches < PROBATION_BATCHES && self.previous.is_some()
    }

    /// What to do with `results`, which the current chain just made of a
    /// batch (see the module's rules); `more`: whether more records can
    /// still join the batch. A rollback happens here.
    pub fn verdict(&mut self, results: &Results<ChainFailure>, more: bool) -> Verdict {
        let probation = self.on_probation();
        let too_small = more && results.len() < SURGE_MIN_RECORDS;
        let Some(failing) = self.failing(results, probation && !too_small) else {
            let unjudged = self.batches == 0 || results.errors().next().is_some();
            let waits = probation && too_small && unjudged && self.policy != OnPluginFailure::DeadLetter;
            return if waits { Verdict::Gather } else { Verdict::Deliver };
        };
        match self.policy {
            OnPluginFailure::DeadLetter => Verdict::DeliverFailing(failing),
            OnPluginFailure::Rollback if self.previous.is_some() => {
                self.roll_back(&failing);
                Verdict::RunAgain
            }
            _ => Verdict::Pause(failing),
        }
    }

    /// Whether the current chain is failing, after it ran `results`: a
    /// fault streak or isolation over budget (any time), or, when `judged`
    /// (on probation after a swap), an error surge against the previous
    /// version's rate.
    fn failing(&mut self, results: &Results<ChainFailure>, judged: bool) -> Option<VersionFailing> {
        if let Some(failing) = self.current.take_failing() {
            return Some(failing);
        }
        if !judged || results.is_empty() {
            return None;
        }
        let failed: Vec<&ChainFailure> = results.errors().collect();
        let rate = failed.len() as f64 / results.len() as f64;
        if rate <= 0.5 || self.previous_rate >= 0.05 {
            return None;
        }
        // The stage that failed the most records is the one surging.
        let mut per_plugin: BTreeMap<&str, usize> = BTreeMap::new();
        for f in &failed {
            *per_plugin.entry(f.plugin.as_str()).or_default() += 1;
        }
        let plugin = per_plugin.iter().max_by_key(|(_, n)| **n).map(|(p, _)| *p)?;
        let example = failed.iter().find(|f| f.plugin == plugin)?;
        let stage = self.current.versions().into_iter().find(|s| s.plugin == plugin)?;
        Some(VersionFailing {
            plugin: plugin.to_string(),
            version: stage.hash,
            key: stage.key,
            reason: format!(
                "error surge: {} of {} records failed ({:.0}%; the previous version: {:.1}%), e.g. {}",
                failed.len(),
                results.len(),
                rate * 100.0,
                self.previous_rate * 100.0,
                example.error
            ),
        })
    }

    /// `results` are on their way to the sinks: they count for the error rate.
    pub fn record(&mut self, results: &Results<ChainFailure>) {
        let errors = results.errors().count() as f64;
        self.recent = (self.recent.0 * 0.8 + errors, self.recent.1 * 0.8 + results.len() as f64);
        self.batches = self.batches.saturating_add(1);
    }

    /// Swaps back to the previous chain after `failing`, refusing the failing version.
    fn roll_back(&mut self, failing: &VersionFailing) {
        let Some(previous) = self.previous.take() else { return };
        let bad = std::mem::replace(&mut self.current, previous);
        let old = self.current.versions().into_iter().find(|s| s.plugin == failing.plugin);
        let old = old.map_or_else(|| "-".to_string(), |s| s.short().to_string());
        let new = failing.version.get(..12).unwrap_or(&failing.version);
        self.refused.refuse(&failing.key, &failing.reason);
        error!(
            pipeline = %self.pipeline,
            plugin = %failing.plugin,
            from = %new,
            to = %old,
            reason = %failing.reason,
            "plugin version rolled back before any of its output was delivered; this version (file and config) is refused until either changes"
        );
        telemetry().rolled_back(
            &self.pipeline,
            &failing.plugin,
            &format!("{} {new} -> {old}: {}", failing.plugin, failing.reason),
        );
        telemetry().set_plugins(&self.pipeline, &shown_versions(&self.current));
        drop(bad);
        self.batches = PROBATION_BATCHES;
        self.recent = (0.0, 0.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A chain of one stage `plugin@hash`, which says it is failing when told.
    struct Fake {
        hash: &'static str,
        failing: Option<String>,
    }

    impl Fake {
        fn new(hash: &'static str) -> Fake {
            Fake { hash, failing: None }
        }
    }

    impl Versioned for Fake {
        fn take_failing(&mut self) -> Option<VersionFailing> {
            let reason = self.failing.take()?;
            Some(VersionFailing {
                plugin: "p".into(),
                version: self.hash.into(),
                key: format!("key-{}", self.hash),
                reason,
            })
        }

        fn versions(&self) -> Vec<StageVersion> {
            vec![StageVersion { plugin: "p".into(), hash: self.hash.into(), key: format!("key-{}", self.hash) }]
        }
    }

    /// Results of `n` records, the first `failed` of them failed by plugin `p`.
    fn results(n: usize, failed: usize) -> Results<ChainFailure> {
        let mut results = Results::default();
        for i in 0..n {
            if i < failed {
                results.push_err(ChainFailure { plugin: "p".into(), error: format!("bad record {i}") });
            } else {
                results.push_ok(std::iter::empty());
            }
        }
        results
    }

    fn supervisor(policy: OnPluginFailure) -> (Supervisor<Fake>, Refused) {
        let refused = Refused::default();
        (Supervisor::new("t".into(), Fake::new("old"), policy, refused.clone()), refused)
    }

    /// Runs `n` records with `failed` failures through the current chain and
    /// takes the verdict (more records can join the batch), counting the
    /// batch when it is delivered.
    fn run(s: &mut Supervisor<Fake>, n: usize, failed: usize) -> Verdict {
        run_batch(s, n, failed, true)
    }

    /// [`run`], saying whether `more` records can join the batch.
    fn run_batch(s: &mut Supervisor<Fake>, n: usize, failed: usize, more: bool) -> Verdict {
        let r = results(n, failed);
        let verdict = s.verdict(&r, more);
        if matches!(verdict, Verdict::Deliver | Verdict::DeliverFailing(_)) {
            s.record(&r);
        }
        verdict
    }

    #[test]
    fn an_error_surge_on_probation_rolls_back_and_refuses_the_version() {
        let (mut s, refused) = supervisor(OnPluginFailure::Rollback);
        assert_eq!(run(&mut s, 100, 1), Verdict::Deliver);
        s.swap_in(Fake::new("new"));
        assert!(s.on_probation());
        assert_eq!(run(&mut s, 5, 5), Verdict::Gather, "too small a batch to judge: nothing delivered");
        assert_eq!(run(&mut s, 20, 11), Verdict::RunAgain, "55% failed against 1%: a surge");
        assert_eq!(s.current().hash, "old", "rolled back");
        assert!(!s.on_probation(), "the old version is not on probation");
        let reason = refused.reason("key-new").expect("the failing version is refused");
        assert!(
            reason.starts_with("error surge: 11 of 20 records failed (55%; the previous version: 1.0%)"),
            "{reason}"
        );
        assert_eq!(refused.reason("key-old"), None);
    }

    /// Nothing a new version makes is delivered before it is judged on
    /// enough records: its first batch, and a later one with a failure,
    /// gather more; a batch no more records join is judged as it is.
    #[test]
    fn on_probation_a_small_batch_gathers_more_before_anything_is_delivered() {
        let (mut s, _) = supervisor(OnPluginFailure::Rollback);
        assert_eq!(run(&mut s, 3, 0), Verdict::Deliver, "no probation before a swap");
        s.swap_in(Fake::new("new"));
        assert_eq!(run(&mut s, 3, 0), Verdict::Gather, "the new version's first batch waits for a sample");
        assert_eq!(run(&mut s, 10, 0), Verdict::Deliver, "judged on 10 records");
        assert_eq!(run(&mut s, 3, 0), Verdict::Deliver, "a small clean batch after the first");
        assert_eq!(run(&mut s, 3, 1), Verdict::Gather, "a small batch with a failure waits for more");
        assert_eq!(run_batch(&mut s, 3, 1, false), Verdict::Deliver, "one in three is no surge");
        assert_eq!(run_batch(&mut s, 3, 2, false), Verdict::RunAgain, "no more came: judged on what there is");
        assert_eq!(s.current().hash, "old", "rolled back");

        let (mut s, _) = supervisor(OnPluginFailure::DeadLetter);
        s.swap_in(Fake::new("new"));
        assert_eq!(run(&mut s, 3, 3), Verdict::Deliver, "dead_letter delivers failures whatever the verdict");
    }

    #[test]
    fn no_surge_is_judged_off_probation_or_against_a_version_that_failed_as_much() {
        let (mut s, _) = supervisor(OnPluginFailure::Rollback);
        assert_eq!(run(&mut s, 20, 20), Verdict::Deliver, "the first version is on no probation");
        s.swap_in(Fake::new("new"));
        assert_eq!(run(&mut s, 20, 20), Verdict::Deliver, "the previous version failed as much");

        let (mut s, _) = supervisor(OnPluginFailure::Rollback);
        s.swap_in(Fake::new("new"));
        for _ in 0..PROBATION_BATCHES {
            assert_eq!(run(&mut s, 20, 0), Verdict::Deliver);
        }
        assert!(!s.on_probation());
        assert_eq!(run(&mut s, 20, 20), Verdict::Deliver, "probation is over");
    }

    #[test]
    fn a_stage_failing_by_its_own_verdict_pauses_without_a_version_to_go_back_to() {
        let (mut s, refused) = supervisor(OnPluginFailure::Rollback);
        s.current().failing = Some("trap on 5 records in a row".into());
        let Verdict::Pause(failing) = run(&mut s, 3, 3) else { panic!("pauses") };
        assert_eq!((failing.version.as_str(), failing.reason.as_str()), ("old", "trap on 5 records in a row"));
        assert_eq!(refused.reason("key-old"), None, "nothing is refused by a pause");
        s.replace(Fake::new("fixed"));
        assert!(!s.on_probation(), "a version replacing a paused one has nothing to roll back to");
        assert_eq!(run(&mut s, 3, 0), Verdict::Deliver);
    }

    #[test]
    fn each_policy_decides_what_a_failing_version_gets() {
        for (policy, want) in [
            (OnPluginFailure::Rollback, "run again"),
            (OnPluginFailure::Pause, "pause"),
            (OnPluginFailure::DeadLetter, "deliver"),
        ] {
            let (mut s, _) = supervisor(policy);
            s.swap_in(Fake::new("new"));
            s.current().failing = Some("isolation over budget".into());
            let got = match run(&mut s, 3, 3) {
                Verdict::RunAgain => "run again",
                Verdict::Pause(_) => "pause",
                Verdict::DeliverFailing(_) => "deliver",
                Verdict::Deliver | Verdict::Gather => "nothing",
            };
            assert_eq!(got, want, "{policy:?}");
        }
    }
}
