//! Severity → tier → destinations.
//!
//! An alert's `severity` label becomes a [`Tier`] through a case-insensitive
//! map (defaults from DESIGN.md, overridable in `[routing.severity]`); an
//! unknown or missing severity goes to `routing.default_tier` and is flagged,
//! never dropped. A group's tier is its most severe alert's. Destinations are
//! chosen by tier and optional label regexes. This module is pure: no I/O,
//! no network, no store.

use std::collections::BTreeMap;

pub use crate::config::routing::{
    default_severity_map, pagerduty_id, webhook_id, Classified, Destination, Escalation, Routing,
    Target, Tier, DEFAULT_SEVERITIES,
};
use crate::config::Secret;

impl Routing {
    /// Maps one `severity` label value (absent → unknown).
    pub fn classify(&self, severity: Option<&str>) -> Classified {
        match severity
            .map(|s| s.trim().to_ascii_lowercase())
            .and_then(|s| self.severity.get(&s).copied())
        {
            Some(tier) => Classified {
                tier,
                unknown: false,
            },
            None => Classified {
                tier: self.default_tier,
                unknown: true,
            },
        }
    }

    /// A group's tier: its most severe alert's; unknown if any alert's
    /// severity was unknown. An empty group gets the default tier.
    pub fn classify_group<'a>(
        &self,
        severities: impl IntoIterator<Item = Option<&'a str>>,
    ) -> Classified {
        let mut best: Option<Tier> = None;
        let mut unknown = false;
        for s in severities {
            let c = self.classify(s);
            unknown |= c.unknown;
            best = Some(best.map_or(c.tier, |b| b.min(c.tier)));
        }
        Classified {
            tier: best.unwrap_or(self.default_tier),
            unknown,
        }
    }

    /// Every target for a group of this tier and these (common) labels,
    /// de-duplicated, in config order. A `digest = true` destination's P4
    /// groups wait for the digest: they get no target here.
    pub fn targets(&self, tier: Tier, labels: &BTreeMap<String, String>) -> Vec<Target> {
        let mut out: Vec<Target> = Vec::new();
        for d in &self.destinations {
            if d.matches(tier, labels) && !(d.digest && tier == Tier::P4) {
                for t in d.targets() {
                    if !out.contains(&t) {
                        out.push(t);
                    }
                }
            }
        }
        out
    }

    /// The webhook URL behind a `webhook:<id>` target, if still configured.
    pub fn webhook_url(&self, id: &str) -> Option<&Secret> {
        self.destinations
            .iter()
            .filter_map(|d| d.webhook_url.as_ref())
            .find(|u| webhook_id(u) == id)
    }

    /// The routing key behind a `pagerduty:<id>` target, if still configured.
    pub fn pagerduty_key(&self, id: &str) -> Option<&Secret> {
        self.pagerduty_keys.get(id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dest(tiers: &[Tier], slack: &str) -> Destination {
        Destination {
            slack_channel: Some(slack.into()),
            ..Destination::new(tiers.to_vec())
        }
    }

    #[test]
    fn severities_map_to_tiers_case_insensitively() {
        let r = Routing::default();
        let check = |s: Option<&str>, tier: Tier, unknown: bool| {
            assert_eq!(r.classify(s), Classified { tier, unknown }, "{s:?}");
        };
        check(Some("critical"), Tier::P1, false);
        check(Some("SEV-1"), Tier::P1, false);
        check(Some("P2"), Tier::P2, false);
        check(Some("high"), Tier::P2, false);
        check(Some("Warning"), Tier::P3, false);
        check(Some("info"), Tier::P4, false);
        check(Some("low"), Tier::P4, false);
        check(Some("catastrophic"), Tier::P3, true);
        check(None, Tier::P3, true);
    }

    #[test]
    fn group_takes_the_most_severe_tier_and_flags_unknowns() {
        let r = Routing::default();
        let c = r.classify_group([Some("warning"), Some("critical"), Some("bogus")]);
        assert_eq!(
            c,
            Classified {
                tier: Tier::P1,
                unknown: true
            }
        );
    }

    #[test]
    fn targets_by_tier_and_matchers() {
        let mut ml = dest(&[Tier::P1], "CML");
        ml.matchers = vec![(
            "team".into(),
            crate::config::anchored_regex("ml-.*".into()).unwrap(),
        )];
        let r = Routing {
            destinations: vec![
                dest(&[Tier::P1, Tier::P2], "CP1"),
                dest(&[Tier::P3], "CP3"),
                ml,
            ],
            ..Routing::default()
        };
        let labels = |team: &str| BTreeMap::from([("team".to_string(), team.to_string())]);
        let keys = |tier, team| {
            r.targets(tier, &labels(team))
                .iter()
                .map(Target::key)
                .collect::<Vec<_>>()
        };
        assert_eq!(keys(Tier::P1, "ml-infra"), ["slack:CP1", "slack:CML"]);
        assert_eq!(keys(Tier::P1, "storage"), ["slack:CP1"]);
        assert_eq!(keys(Tier::P3, "ml-infra"), ["slack:CP3"]);
        assert!(keys(Tier::P4, "x").is_empty());
    }

    #[test]
    fn target_keys_round_trip_and_hide_webhook_urls() {
        let url = Secret::new("https://hooks.example.com/secret-token");
        let id = webhook_id(&url);
        for t in [
            Target::Slack("C1".into()),
            Target::Discord(42),
            Target::Webhook(id.clone()),
            Target::Console,
            Target::PagerDuty("0a1b2c3d4e5f".into()),
            Target::Email("oncall@example.com".into()),
        ] {
            assert_eq!(Target::parse_key(&t.key()), Some(t.clone()));
        }
        assert!(!Target::Webhook(id).key().contains("secret"));
    }
}
