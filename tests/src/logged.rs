//! Counts the warnings and errors the services log in this test process, by message: a
//! global `tracing` subscriber (installed once; every test of the binary shares it, so run
//! a test alone for its own figures).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, OnceLock};
use tracing::field::{Field, Visit};
use tracing_subscriber::layer::{Context, SubscriberExt};

type Counts = Arc<Mutex<BTreeMap<String, u64>>>;

/// Warnings and errors logged since [`Logged::install`], by level and message.
#[derive(Clone)]
pub struct Logged(Counts);

struct Counter(Counts);

struct Message(String);

impl Visit for Message {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            self.0 = format!("{value:?}");
        }
    }
}

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Counter {
    fn on_event(&self, event: &tracing::Event<'_>, _: Context<'_, S>) {
        let level = *event.metadata().level();
        if level <= tracing::Level::WARN {
            let mut m = Message(String::new());
            event.record(&mut m);
            *self
                .0
                .lock()
                .unwrap()
                .entry(format!("{level} {}", m.0))
                .or_default() += 1;
        }
    }
}

impl Logged {
    /// The process's counter (installed as the global subscriber on the first call).
    pub fn install() -> Self {
        static LOGGED: OnceLock<Logged> = OnceLock::new();
        LOGGED
            .get_or_init(|| {
                let counts = Counts::default();
                let subscriber = tracing_subscriber::registry().with(Counter(counts.clone()));
                tracing::subscriber::set_global_default(subscriber)
                    .expect("no other global subscriber");
                Logged(counts)
            })
            .clone()
    }

    /// The counts so far.
    pub fn counts(&self) -> BTreeMap<String, u64> {
        self.0.lock().unwrap().clone()
    }

    /// The counts logged since `before` (an earlier [`Logged::counts`]).
    pub fn since(&self, before: &BTreeMap<String, u64>) -> BTreeMap<String, u64> {
        self.counts()
            .into_iter()
            .filter_map(|(k, n)| {
                let d = n - before.get(&k).copied().unwrap_or(0);
                (d > 0).then_some((k, d))
            })
            .collect()
    }
}
