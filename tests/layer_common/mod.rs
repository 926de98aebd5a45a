//! Shared set-up for the channel-layer tests: a layer on a temp dir with a manual clock.

#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use herald::ChannelLayer;
use herald::config::Settings;
use herald::layer::PageRequest;
use herald::layer::clock::ManualClock;
use herald::message::Message;
use tempfile::TempDir;

/// A layer under test, reopenable on the same directory.
pub struct TestLayer {
    pub layer: ChannelLayer,
    pub clock: Arc<ManualClock>,
    pub settings: Settings,
    pub dir: TempDir,
}

/// Default settings with the data dir set to a fresh temp dir.
pub fn settings(dir: &TempDir) -> Settings {
    let mut settings = Settings::load(None).expect("defaults load");
    settings.storage.data_dir = dir.path().to_path_buf();
    settings
}

impl TestLayer {
    /// A layer with default settings.
    pub fn new() -> Self {
        Self::with(|_| {})
    }

    /// A layer with settings changed by `tweak`.
    pub fn with(tweak: impl FnOnce(&mut Settings)) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut settings = settings(&dir);
        tweak(&mut settings);
        TestLayer::open(settings, dir, Arc::new(ManualClock::new(1_800_000_000_000)))
    }

    fn open(settings: Settings, dir: TempDir, clock: Arc<ManualClock>) -> Self {
        let layer = ChannelLayer::open(&settings, clock.clone()).unwrap();
        TestLayer {
            layer,
            clock,
            settings,
            dir,
        }
    }

    /// Closes the layer and opens it again on the same data dir (every clone of the
    /// layer must be gone: the old one holds the directory's lock until dropped).
    pub fn restart(self) -> Self {
        let TestLayer {
            layer,
            clock,
            settings,
            dir,
        } = self;
        drop(layer);
        TestLayer::open(settings, dir, clock)
    }

    pub fn advance(&self, secs: u64) {
        self.clock.advance(Duration::from_secs(secs));
    }
}

/// `{"type": ty, "n": n}`.
pub fn msg(ty: &str, n: i64) -> Message {
    Message::from_json(format!(r#"{{"type":"{ty}","n":{n}}}"#).as_bytes()).unwrap()
}

/// The `"n"` of a message made by [`msg`].
pub fn n_of(message: &Message) -> i64 {
    serde_json::from_str::<serde_json::Value>(message.json()).unwrap()["n"]
        .as_i64()
        .unwrap()
}

/// Receives without waiting; panics on error.
pub async fn take(layer: &ChannelLayer, channel: &str) -> Option<(u64, i64)> {
    layer
        .receive(channel, Duration::ZERO)
        .await
        .unwrap()
        .map(|d| (d.id, n_of(&d.message)))
}

/// The first page of every listing, long enough for any test.
pub const ALL: PageRequest<'static> = PageRequest {
    after: None,
    limit: 1000,
};

/// The current members of `group`, by name.
pub fn members(layer: &ChannelLayer, group: &str) -> Vec<String> {
    let page = layer.group_members(group, ALL).unwrap();
    assert_eq!(page.next, None, "one page holds them");
    page.items
}
