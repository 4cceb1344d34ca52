//! Request counters, a latency histogram and an in-flight gauge, written in
//! the Prometheus text exposition format.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

/// Upper bounds of the latency buckets, in seconds.
pub const LATENCY_BUCKETS: [f64; 12] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

#[derive(Debug, Default, Clone)]
struct Histogram {
    /// Non-cumulative counts per bucket; the last is `+Inf`.
    buckets: [u64; LATENCY_BUCKETS.len() + 1],
    sum: f64,
    count: u64,
}

#[derive(Debug, Default, Clone)]
struct Counters {
    /// (route, status) → requests.
    requests: BTreeMap<(String, u16), u64>,
    /// route → latency.
    latency: BTreeMap<String, Histogram>,
}

/// All metrics of one server. Routes are the matched route patterns (not the
/// raw paths), so their number is bounded.
#[derive(Debug, Default)]
pub struct Metrics {
    counters: Mutex<Counters>,
    in_flight: AtomicI64,
}

/// Decrements the in-flight gauge when dropped, so a cancelled request is
/// not counted forever.
#[derive(Debug)]
pub struct InFlight<'a>(&'a AtomicI64);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Metrics {
    fn lock(&self) -> MutexGuard<'_, Counters> {
        // A panic while holding the lock cannot leave the counters invalid.
        self.counters.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts a request as in flight until the guard drops.
    pub fn start(&self) -> InFlight<'_> {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(&self.in_flight)
    }

    /// Records a finished request.
    pub fn record(&self, route: &str, status: u16, elapsed: Duration) {
        let seconds = elapsed.as_secs_f64();
        let mut counters = self.lock();
        *counters
            .requests
            .entry((route.to_owned(), status))
            .or_insert(0) += 1;
        let histogram = counters.latency.entry(route.to_owned()).or_default();
        let bucket = LATENCY_BUCKETS
            .iter()
            .position(|le| seconds <= *le)
            .unwrap_or(LATENCY_BUCKETS.len());
        histogram.buckets[bucket] += 1;
        histogram.sum += seconds;
        histogram.count += 1;
    }

    /// Requests recorded for `route` with `status`.
    pub fn requests(&self, route: &str, status: u16) -> u64 {
        self.lock()
            .requests
            .get(&(route.to_owned(), status))
            .copied()
            .unwrap_or(0)
    }

    /// The Prometheus text exposition (format 0.0.4). `extra` lines (gauges
    /// owned by the caller) are appended as given.
    pub fn render(&self, extra: &[(&str, &str, f64)]) -> String {
        let counters = self.lock().clone();
        let mut out = String::new();
        out.push_str(
            "# HELP flawscope_http_requests_total HTTP requests by route and status.\n\
             # TYPE flawscope_http_requests_total counter\n",
        );
        for ((route, status), n) in &counters.requests {
            let _ = writeln!(
                out,
                "flawscope_http_requests_total{{route=\"{}\",status=\"{status}\"}} {n}",
                escape(route)
            );
        }
        out.push_str(
            "# HELP flawscope_http_request_duration_seconds Time to answer a request.\n\
             # TYPE flawscope_http_request_duration_seconds histogram\n",
        );
        for (route, h) in &counters.latency {
            let route = escape(route);
            let mut cumulative = 0;
            for (i, n) in h.buckets.iter().enumerate() {
                cumulative += n;
                let le = LATENCY_BUCKETS
                    .get(i)
                    .map_or_else(|| "+Inf".to_owned(), |b| b.to_string());
                let _ = writeln!(
                    out,
                    "flawscope_http_request_duration_seconds_bucket{{route=\"{route}\",le=\"{le}\"}} {cumulative}"
                );
            }
            let _ = writeln!(
                out,
                "flawscope_http_request_duration_seconds_sum{{route=\"{route}\"}} {}",
                h.sum
            );
            let _ = writeln!(
                out,
                "flawscope_http_request_duration_seconds_count{{route=\"{route}\"}} {}",
                h.count
            );
        }
        let _ = write!(
            out,
            "# HELP flawscope_http_requests_in_flight Requests being answered now.\n\
             # TYPE flawscope_http_requests_in_flight gauge\n\
             flawscope_http_requests_in_flight {}\n",
            self.in_flight.load(Ordering::Relaxed)
        );
        for (name, help, value) in extra {
            let _ = write!(
                out,
                "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}\n"
            );
        }
        out
    }
}

/// Escapes a label value.
fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_is_cumulative_and_counts_match() {
        let m = Metrics::default();
        m.record("/a", 200, Duration::from_millis(3));
        m.record("/a", 200, Duration::from_millis(300));
        m.record("/a", 503, Duration::from_secs(100));
        let text = m.render(&[("flawscope_models_loaded", "Models served.", 2.0)]);
        assert!(text.contains("flawscope_http_requests_total{route=\"/a\",status=\"200\"} 2"));
        assert!(text.contains("flawscope_http_requests_total{route=\"/a\",status=\"503\"} 1"));
        assert!(text.contains("_bucket{route=\"/a\",le=\"0.005\"} 1\n"));
        assert!(text.contains("_bucket{route=\"/a\",le=\"0.5\"} 2\n"));
        assert!(text.contains("_bucket{route=\"/a\",le=\"+Inf\"} 3\n"));
        assert!(text.contains("_count{route=\"/a\"} 3\n"));
        assert!(text.contains("flawscope_models_loaded 2\n"));
        {
            let _guard = m.start();
            assert!(
                m.render(&[])
                    .contains("flawscope_http_requests_in_flight 1\n")
            );
        }
        assert!(
            m.render(&[])
                .contains("flawscope_http_requests_in_flight 0\n")
        );
        assert_eq!(escape("a\"b\\"), "a\\\"b\\\\");
    }
}
