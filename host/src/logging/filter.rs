//! Which events the log keeps: `RUST_LOG`'s directives, as
//! `tracing-subscriber`'s [`EnvFilter`] reads them, without the per-poll
//! work that only span directives need.
//!
//! Why a wrapper: `EnvFilter`, installed as a layer, is told of every span's
//! creation, entry, exit and close, and takes a lock and looks the span up
//! each time, in case a directive names a span (`[run{job=sweep}]=debug`).
//! The run's span is entered and exited on every poll of the run (dozens per
//! run: one per round trip and more), from every worker thread, on one
//! shared lock. Directives without a span (the default, `info,sqlx=warn`,
//! and most `RUST_LOG`s) never use what those calls track, so [`Filter`]
//! passes them on only when a directive names a span or a field's value.

use tracing::Metadata;
use tracing::span;
use tracing::subscriber::{Interest, Subscriber};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::layer::{Context, Layer};

/// `RUST_LOG`'s filter (see the [module](self) for what it leaves out).
pub struct Filter {
    env: EnvFilter,
    /// Whether a directive filters by span or field value: only then does
    /// the filter need to follow spans.
    follows_spans: bool,
}

impl Filter {
    /// The filter of `directives` (`RUST_LOG`'s syntax), or the error that
    /// says which directive is wrong.
    pub fn new(directives: &str) -> Result<Filter, tracing_subscriber::filter::ParseError> {
        Ok(Filter {
            env: EnvFilter::try_new(directives)?,
            // A directive names a span, or a field's value, only in
            // brackets: `target[span{field=value}]=level`.
            follows_spans: directives.contains('['),
        })
    }

    /// `RUST_LOG`'s directives; `default` when it is unset or cannot be
    /// read (`EnvFilter`'s own fallback).
    pub fn from_env_or(default: &str) -> Filter {
        std::env::var("RUST_LOG")
            .ok()
            .and_then(|d| Filter::new(&d).ok())
            .unwrap_or_else(|| Filter::new(default).expect("the default filter parses"))
    }

    /// Whether the filter follows spans (a directive filters by one).
    pub fn follows_spans(&self) -> bool {
        self.follows_spans
    }
}

impl<S: Subscriber> Layer<S> for Filter {
    fn register_callsite(&self, metadata: &'static Metadata<'static>) -> Interest {
        Layer::<S>::register_callsite(&self.env, metadata)
    }

    fn max_level_hint(&self) -> Option<LevelFilter> {
        Layer::<S>::max_level_hint(&self.env)
    }

    fn enabled(&self, metadata: &Metadata<'_>, ctx: Context<'_, S>) -> bool {
        Layer::<S>::enabled(&self.env, metadata, ctx)
    }

    fn on_new_span(&self, attrs: &span::Attributes<'_>, id: &span::Id, ctx: Context<'_, S>) {
        if self.follows_spans {
            Layer::<S>::on_new_span(&self.env, attrs, id, ctx);
        }
    }

    fn on_record(&self, id: &span::Id, values: &span::Record<'_>, ctx: Context<'_, S>) {
        if self.follows_spans {
            Layer::<S>::on_record(&self.env, id, values, ctx);
        }
    }

    fn on_enter(&self, id: &span::Id, ctx: Context<'_, S>) {
        if self.follows_spans {
            Layer::<S>::on_enter(&self.env, id, ctx);
        }
    }

    fn on_exit(&self, id: &span::Id, ctx: Context<'_, S>) {
        if self.follows_spans {
            Layer::<S>::on_exit(&self.env, id, ctx);
        }
    }

    fn on_close(&self, id: span::Id, ctx: Context<'_, S>) {
        if self.follows_spans {
            Layer::<S>::on_close(&self.env, id, ctx);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use tracing_subscriber::layer::SubscriberExt as _;

    use super::*;

    /// The lines `directives` let through when `emit` runs.
    fn logged(directives: &str, emit: impl FnOnce()) -> String {
        let out = Arc::new(Mutex::new(Vec::<u8>::new()));
        let writer = {
            let out = out.clone();
            move || Sink(out.clone())
        };
        let subscriber = tracing_subscriber::registry()
            .with(Filter::new(directives).unwrap())
            .with(
                tracing_subscriber::fmt::layer()
                    .with_writer(writer)
                    .with_ansi(false)
                    .without_time(),
            );
        tracing::subscriber::with_default(subscriber, emit);
        String::from_utf8(out.lock().unwrap().clone()).unwrap()
    }

    struct Sink(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Sink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn in_runs_of(job: &str) {
        let span = tracing::info_span!("run", job);
        let _entered = span.enter();
        tracing::debug!("detail of {job}");
        tracing::info!("run ok");
    }

    #[test]
    fn a_directive_naming_a_span_still_filters_by_it() {
        let filter = Filter::new("info,[run{job=sweep}]=debug").unwrap();
        assert!(filter.follows_spans());
        let text = logged("info,[run{job=sweep}]=debug", || {
            in_runs_of("sweep");
            in_runs_of("drip");
        });
        assert!(text.contains("detail of sweep"), "{text}");
        assert!(!text.contains("detail of drip"), "{text}");
        assert_eq!(text.matches("run ok").count(), 2, "{text}");
    }

    #[test]
    fn plain_directives_filter_by_target_and_level_alone() {
        let filter = Filter::new(crate::logging::DEFAULT_FILTER).unwrap();
        assert!(!filter.follows_spans());
        let text = logged("info,jobhost::logging=debug,other=warn", || {
            in_runs_of("sweep");
            tracing::info!(target: "other", "not at info");
            tracing::warn!(target: "other", "at warn");
        });
        assert!(text.contains("detail of sweep"), "{text}");
        assert!(text.contains("run ok"), "{text}");
        assert!(
            text.contains("at warn") && !text.contains("not at info"),
            "{text}"
        );
    }

    #[test]
    fn a_wrong_directive_is_an_error() {
        assert!(Filter::new("info,sqlx=loud").is_err());
    }
}
