//! Permission patterns: `channel:GLOB` and `group:GLOB` on full names, with the glob
//! syntax of `[layer.channel_capacity]`, and `*` for every channel and group.

use globset::GlobMatcher;

use crate::config::{ConfigError, glob, invalid};

/// What an operation touches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A channel, by its full name.
    Channel(String),
    /// A group, by its name.
    Group(String),
    /// Every channel whose name starts with `prefix.` (`new_channel`): covered by a
    /// pattern that matches the name `prefix.*` itself, such as `channel:prefix.*`.
    ChannelsUnder(String),
}

/// A list of permission patterns, compiled.
#[derive(Debug, Clone, Default)]
pub(crate) struct Patterns {
    every: bool,
    channels: Vec<GlobMatcher>,
    groups: Vec<GlobMatcher>,
}

impl Patterns {
    /// Every channel and group.
    pub(crate) fn every() -> Self {
        Patterns {
            every: true,
            ..Patterns::default()
        }
    }

    /// Compiles `list`; `key` names the setting (or claim) in the error.
    pub(crate) fn parse(key: &str, list: &[String]) -> Result<Self, ConfigError> {
        let mut patterns = Patterns::default();
        for pattern in list {
            if pattern == "*" {
                patterns.every = true;
            } else if let Some(name) = pattern.strip_prefix("channel:") {
                patterns.channels.push(glob(key, name)?);
            } else if let Some(name) = pattern.strip_prefix("group:") {
                patterns.groups.push(glob(key, name)?);
            } else {
                return Err(invalid(
                    key,
                    &format!("{pattern:?} is not \"*\", \"channel:GLOB\" or \"group:GLOB\""),
                ));
            }
        }
        Ok(patterns)
    }

    /// Whether the patterns cover `target`.
    pub(crate) fn covers(&self, target: &Target) -> bool {
        let matches = |globs: &[GlobMatcher], name: &str| globs.iter().any(|g| g.is_match(name));
        self.every
            || match target {
                Target::Channel(name) => matches(&self.channels, name),
                Target::Group(name) => matches(&self.groups, name),
                Target::ChannelsUnder(prefix) => matches(&self.channels, &format!("{prefix}.*")),
            }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(list: &[&str]) -> Patterns {
        let list: Vec<String> = list.iter().map(|s| s.to_string()).collect();
        Patterns::parse("test", &list).unwrap()
    }

    #[test]
    fn patterns_match_full_names_by_kind() {
        let p = parse(&["channel:user.42", "channel:chat.*", "group:news"]);
        let channel = |n: &str| Target::Channel(n.into());
        assert!(p.covers(&channel("user.42")));
        assert!(!p.covers(&channel("user.420")));
        assert!(p.covers(&channel("chat.room!abc")));
        assert!(!p.covers(&channel("news")));
        assert!(p.covers(&Target::Group("news".into())));
        assert!(!p.covers(&Target::Group("chat.x".into())));
        assert!(p.covers(&Target::ChannelsUnder("chat".into())));
        assert!(!p.covers(&Target::ChannelsUnder("user".into())));
        let every = parse(&["*"]);
        assert!(every.covers(&channel("anything")) && every.covers(&Target::Group("g".into())));
        assert!(parse(&["group:*"]).covers(&Target::Group("g".into())));
        assert!(!parse(&[]).covers(&channel("c")));
    }

    #[test]
    fn bad_patterns_are_refused() {
        for bad in ["user.42", "channel:a[", "topic:x", ""] {
            assert!(Patterns::parse("k", &[bad.to_string()]).is_err(), "{bad:?}");
        }
    }
}
