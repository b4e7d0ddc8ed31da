//! One `collective` span per call, blocking and non-blocking, with op, bytes, backend and duration:
//! captured by a recording tracing layer (this binary holds only this test, because it installs the
//! global subscriber that the rank threads report to).

use ferroccl::prelude::*;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing_subscriber::layer::{Context, Layer, SubscriberExt};

#[derive(Default, Debug, Clone)]
struct Seen {
    fields: HashMap<String, String>,
    closed: bool,
}

#[derive(Default, Clone)]
struct Recorder(Arc<Mutex<HashMap<u64, Seen>>>);

struct Fields<'a>(&'a mut HashMap<String, String>);
impl Visit for Fields<'_> {
    fn record_debug(&mut self, f: &Field, v: &dyn std::fmt::Debug) {
        self.0.insert(f.name().into(), format!("{v:?}"));
    }
    fn record_str(&mut self, f: &Field, v: &str) {
        self.0.insert(f.name().into(), v.into());
    }
}

impl<S: tracing::Subscriber> Layer<S> for Recorder {
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, _: Context<'_, S>) {
        if attrs.metadata().name() != "collective" {
            return;
        }
        let mut seen = Seen::default();
        attrs.record(&mut Fields(&mut seen.fields));
        self.0.lock().unwrap().insert(id.into_u64(), seen);
    }
    fn on_record(&self, id: &Id, values: &Record<'_>, _: Context<'_, S>) {
        if let Some(s) = self.0.lock().unwrap().get_mut(&id.into_u64()) {
            values.record(&mut Fields(&mut s.fields));
        }
    }
    fn on_close(&self, id: Id, _: Context<'_, S>) {
        if let Some(s) = self.0.lock().unwrap().get_mut(&id.into_u64()) {
            s.closed = true;
        }
    }
}

#[test]
fn every_collective_opens_one_span_with_op_bytes_backend_and_duration() {
    let rec = Recorder::default();
    let sub = tracing_subscriber::registry()
        .with(rec.clone())
        .with(tracing_subscriber::filter::LevelFilter::DEBUG);
    tracing::subscriber::set_global_default(sub).unwrap();

    ferroccl::local::run(2, |c| {
        let mut v = vec![1f32; 8];
        c.all_reduce(&mut v, ReduceOp::Sum)?; // blocking: 32 bytes
        let w = c.iall_gather(vec![c.rank() as i64; 3], vec![0i64; 6])?; // 24 bytes in
        let (_, out) = w.wait()?;
        assert_eq!(out, vec![0, 0, 0, 1, 1, 1]);
        Ok(())
    })
    .unwrap();

    let spans: Vec<Seen> = rec.0.lock().unwrap().values().cloned().collect();
    let of = |op: &str| -> Vec<&Seen> {
        spans
            .iter()
            .filter(|s| s.fields.get("op").map(String::as_str) == Some(op))
            .collect()
    };
    let blocking = of("all_reduce");
    let nonblocking = of("all_gather");
    assert_eq!(blocking.len(), 2, "one span per rank: {spans:?}");
    assert_eq!(nonblocking.len(), 2, "one span per rank: {spans:?}");
    for (s, bytes) in blocking
        .iter()
        .map(|s| (s, "32"))
        .chain(nonblocking.iter().map(|s| (s, "24")))
    {
        assert_eq!(
            s.fields.get("bytes").map(String::as_str),
            Some(bytes),
            "{s:?}"
        );
        assert_eq!(
            s.fields.get("backend").map(String::as_str),
            Some("local"),
            "{s:?}"
        );
        let us: f64 = s.fields["duration_us"].parse().unwrap();
        assert!(us > 0.0 && us < 60e6, "{s:?}");
        assert!(s.closed, "the span ends with the collective: {s:?}");
    }
    assert!(nonblocking
        .iter()
        .all(|s| s.fields.contains_key("nonblocking")));
}
